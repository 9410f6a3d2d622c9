"""`hermesflow diagnose ROUND_DIR`: prints the round's diagnostics and writes them only to --out; a round without
candidates, from another world seed, or real data without self-VQA scores is one `error:` line naming the file, exit
status 2; the round folder is never changed."""

import json

import pytest
import torch
from click.testing import CliRunner

from hermesflow_fast.cli import main
from hermesflow_fast.world import make_records
from hermesflow_fast.world.shipped import BASE_DIR, load_base

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with config.yaml and one round: 4 world records × 3 random grids of the shipped base's codes."""
    recs = make_records(4, 0, "train")
    g = torch.Generator().manual_seed(0)
    run = tmp_path / "run"
    rd = run / "round-1"
    rd.mkdir(parents=True)
    (run / "config.yaml").write_text("world:\n  seed: 0\n")
    vocab = json.loads((BASE_DIR / "vocab.json").read_text())
    codes, tokens = vocab["num_image_codes"], load_base().num_image_tokens
    lines = [{"id": r.id, "images": torch.randint(0, codes, (3, tokens), generator=g).tolist()} for r in recs]
    (rd / "gen_candidates.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (rd / "gen_scores.jsonl").write_text("".join(json.dumps({"id": r.id, "accuracy": [1.0, 0.5, 0.0]}) + "\n"
                                                 for r in recs))
    pair = {"id": recs[1].id, "prompt": recs[1].prompt,
            "gen": {"chosen": lines[1]["images"][0], "rejected": lines[1]["images"][2], "scores": [1.0, 0.0]}}
    (rd / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (rd / "stats.json").write_text(json.dumps({"records": 4, "pairs": 1, "und": {"kept": 0, "dropped": {"tie": 4}},
                                               "gen": {"kept": 1, "dropped": {"below threshold": 3}}}))
    return run


def _invoke(args, folder, monkeypatch):
    monkeypatch.delenv("HFF_DEBUG", raising=False)
    before = _snapshot(folder)
    result = CliRunner().invoke(main, ["diagnose", *map(str, args)])
    assert _snapshot(folder) == before, "diagnose changed the round folder"
    return result


def _one_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not result.stdout.strip(), result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_diagnose_prints_and_writes_only_out(run_dir, tmp_path, monkeypatch):
    rd = run_dir / "round-1"
    res = _invoke([rd, "--out", tmp_path / "d.json"], run_dir, monkeypatch)
    assert res.exit_code == 0, res.output
    assert "judge pass@1" in res.stdout and "| **all** | 4 |" in res.stdout and "Codex's unbiased" in res.stdout
    d = json.loads((tmp_path / "d.json").read_text())
    a = d["categories"]["all"]
    assert d["records"] == 4 and d["samples_per_record"] == 3 and a["candidates"] == 12
    assert 0 <= a["judge"]["pass_at_1"] <= a["judge"]["pass_at_m"] <= 1
    assert a["self_vqa"]["pass_at_1"] == pytest.approx(1 / 3) and a["self_vqa"]["pass_at_m"] == 1.0
    assert d["pairs"]["gen"]["kept"] == 1 and d["pairs"]["gen"]["dropped"] == {"below threshold": 3}
    assert d["pairs"]["gen"]["judge_chosen"] is not None and d["unavailable"] == []
    res = _invoke([rd, "--out", tmp_path / "d.md"], run_dir, monkeypatch)
    assert res.exit_code == 0 and (tmp_path / "d.md").read_text() == res.stdout


def test_out_into_a_file_of_the_round_is_refused(run_dir, monkeypatch):
    rd = run_dir / "round-1"
    _one_error(_invoke([rd, "--out", rd / "pairs.jsonl"], run_dir, monkeypatch), f"--out {rd / 'pairs.jsonl'} is a "
                                                                                  f"file of the round")


def test_round_without_candidates_is_named(run_dir, monkeypatch):
    rd = run_dir / "round-0"
    rd.mkdir()
    _one_error(_invoke([rd], run_dir, monkeypatch), f"{rd / 'gen_candidates.jsonl'} does not exist",
               "no generated candidates")


def test_round_from_another_world_seed_is_named(run_dir, monkeypatch):
    _one_error(_invoke([run_dir / "round-1", "--world-seed", "7"], run_dir, monkeypatch),
               f"{run_dir / 'round-1' / 'pairs.jsonl'}: record 'train-000001' has prompt", "another world seed")
    (run_dir / "config.yaml").write_text("world:\n  seed: 7\n")  # the run's config says another seed
    _one_error(_invoke([run_dir / "round-1"], run_dir, monkeypatch), "world seed 7 (world.seed in")


def test_real_data_without_a_judge(run_dir, monkeypatch):
    (run_dir / "config.yaml").write_text("data:\n  records: data/records.jsonl\n")
    res = _invoke([run_dir / "round-1"], run_dir, monkeypatch)
    assert res.exit_code == 0, res.output
    assert "real data: 4 records" in res.stdout and "Not available:" in res.stdout
    assert f"no judge, {run_dir / 'config.yaml'} sets data.records=data/records.jsonl" in res.stdout
    (run_dir / "round-1" / "gen_scores.jsonl").unlink()
    _one_error(_invoke([run_dir / "round-1"], run_dir, monkeypatch),
               f"{run_dir / 'round-1' / 'gen_scores.jsonl'} does not exist and the round has no judge")
