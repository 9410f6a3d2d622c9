"""One short self-play round on CPU from the shipped base: every stage's file, pairs, a trained model, held-out
scores and the report (and, asked, the candidates as PNGs); a run interrupted in a stage resumes to the same pairs."""

import json
import shutil

import pytest

from hermesflow_fast.selfplay.config import SelfPlayConfig
from hermesflow_fast.selfplay.rounds import run_selfplay
from hermesflow_fast.train.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TINY = ["world.train_records=8", "world.heldout_records=6", "curation.caption_grid=[[1,0.0],[3,0.7]]",
        "curation.images_per_prompt=2", "curation.steps=3", "eval.steps=3", "train.batch_size=4", "log.progress=false",
        "curation.batch_size=4", "eval.batch_size=8", "eval.seeds=2"]
IMAGES = ["curation.save_images=true"]  # the first round's run also writes PNGs (a resume keeps its settings)


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    run = tmp_path_factory.mktemp("sp") / "run"
    cfg = load_config(None, TINY + IMAGES, schema=SelfPlayConfig)
    res = run_selfplay(cfg, run, rounds=1, log=lambda m: None)
    return run, res


def test_one_round_writes_every_stage_and_the_report(one_round):
    run, res = one_round
    rd = run / "round-1"
    for name in ("und_candidates", "und_scores", "gen_candidates", "gen_scores"):
        lines = (rd / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 8 and len({json.loads(x)["id"] for x in lines}) == 8
    assert len(list((rd / "images").glob("*/*.png"))) == 8 * 2  # curation.save_images: M PNGs per record
    stats = json.loads((rd / "stats.json").read_text())
    for side in ("und", "gen"):
        assert stats[side]["kept"] + sum(stats[side]["dropped"].values()) == 8
    assert (rd / "model" / "model.safetensors").is_file() and (rd / "train" / "metrics.jsonl").is_file()
    summary = json.loads((run / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in summary] == [0, 1]
    for r in summary:
        assert 0 <= r["und"] <= 1 and 0 <= r["gen"] <= 1 and r["gap"] == pytest.approx(r["und"] - r["gen"])
        # eval.seeds=2: the scores are the mean over evaluation seeds run.seed, run.seed + 1, with their spread
        assert r["seeds"] == [0, 1] and len(r["gen_seeds"]) == 2
        assert r["gen"] == pytest.approx(sum(r["gen_seeds"]) / 2)
        assert r["gen_std"] == pytest.approx(abs(r["gen_seeds"][0] - r["gen_seeds"][1]) / 2 ** 0.5)
    assert f"{summary[1]['gen']:.3f} ± {summary[1]['gen_std']:.3f}" in (run / "report.md").read_text()
    assert (run / "report.md").is_file() and (run / "gap.png").is_file()
    # the round's diagnostics: its 8 records × 2 candidates judged, its pairs counted as stats.json has them
    diag = summary[1]["diagnostics"]
    assert "diagnostics" not in summary[0] and diag["unavailable"] == []
    assert diag["categories"]["all"]["candidates"] == 16
    assert 0 <= diag["categories"]["all"]["judge"]["pass_at_1"] <= diag["categories"]["all"]["judge"]["pass_at_m"]
    assert diag["pairs"]["gen"]["kept"] == stats["gen"]["kept"] and diag["pairs"]["und"]["dropped"] == \
        stats["und"]["dropped"]
    assert "## Diagnostics of round 1" in (run / "report.md").read_text()


def test_resume_in_the_middle_of_a_stage_gives_the_same_pairs(one_round, tmp_path):
    run, _ = one_round
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rd = copy / "round-1"
    for stage in ("gen_scores", "pairs", "train", "eval"):
        (rd / f"{stage}.done").unlink()
    lines = (rd / "gen_scores.jsonl").read_text().splitlines()
    (rd / "gen_scores.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed mid-write
    shutil.rmtree(rd / "train")
    shutil.rmtree(rd / "model")
    (copy / "summary.json").unlink()
    run_selfplay(load_config(None, TINY + IMAGES, schema=SelfPlayConfig), copy, rounds=1, resume=True,
                 log=lambda m: None)
    assert (rd / "gen_scores.jsonl").read_text() == (run / "round-1" / "gen_scores.jsonl").read_text()
    assert (rd / "pairs.jsonl").read_text() == (run / "round-1" / "pairs.jsonl").read_text()


def test_two_processes_curate_exactly_what_one_process_does(one_round, tmp_path):
    """`hermesflow selfplay --nproc 2`: each rank curates a disjoint shard into its own journal, merged by id; the
    merged stage files and the pairs equal the 1-process run's, byte for byte."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run, _ = one_round
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "hermesflow_fast.cli", "selfplay", "--run-dir", str(two), "--rounds", "1",
           "--nproc", "2", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[2], timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for name in ("und_candidates", "und_scores", "gen_candidates", "gen_scores", "pairs"):
        assert (two / "round-1" / f"{name}.jsonl").read_text() == (run / "round-1" / f"{name}.jsonl").read_text(), name
    assert (two / "summary.json").is_file()
    # the held-out evaluation runs once (on the main rank) and scores the base as the 1-process run does
    assert (two / "round-0" / "eval.json").read_text() == (run / "round-0" / "eval.json").read_text()


def test_one_stage_at_a_time_gives_the_same_round(one_round, tmp_path):
    """--stop-after STAGE then --resume: each stage runs on its own; the round ends as the uninterrupted run did."""
    from hermesflow_fast.selfplay import cli

    assert cli.STAGES == __import__("hermesflow_fast.selfplay.rounds", fromlist=["STAGES"]).STAGES
    run, full = one_round
    cfg = load_config(None, TINY, schema=SelfPlayConfig)
    out = tmp_path / "staged"
    res = run_selfplay(cfg, out, rounds=1, log=lambda m: None, stop_after="gen_candidates")
    rd = out / "round-1"
    assert [r["round"] for r in res] == [0]
    assert (rd / "gen_candidates.done").is_file() and not (rd / "gen_scores.jsonl").exists()
    run_selfplay(cfg, out, rounds=1, resume=True, log=lambda m: None, stop_after="pairs")
    assert (rd / "pairs.jsonl").read_text() == (run / "round-1" / "pairs.jsonl").read_text()
    assert not (rd / "train").exists() and not (out / "summary.json").exists()
    res = run_selfplay(cfg, out, rounds=1, resume=True, log=lambda m: None)
    assert [r["round"] for r in res] == [0, 1] and (out / "summary.json").is_file()
    with pytest.raises(ValueError, match="stop_after must be one of"):
        run_selfplay(cfg, out, rounds=1, resume=True, log=lambda m: None, stop_after="captions")


def test_resume_with_other_settings_is_refused_before_anything_is_written(one_round, tmp_path, capsys):
    """Killed in gen_candidates, resumed with another images_per_prompt: one `error:` line naming the key, exit 2,
    every file as it was; a logging change needs --allow-config-change and is then recorded in config.yaml."""
    from hermesflow_fast.errors import user_errors
    from hermesflow_fast.selfplay.cli import selfplay_main

    run, _ = one_round
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for stage in ("gen_candidates", "gen_scores", "pairs", "train", "eval"):
        (copy / "round-1" / f"{stage}.done").unlink()
    (copy / "summary.json").unlink()
    before = {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}

    def cli(*extra: str) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop, user_errors():
            raise SystemExit(selfplay_main(["--run-dir", str(copy), "--rounds", "1", "--resume", *TINY, *IMAGES,
                                            *extra]))
        return stop.value.code, capsys.readouterr().err

    code, err = cli("curation.images_per_prompt=5")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --resume: ")
    assert "curation.images_per_prompt: 2 → 5 cannot change once a run has begun" in lines[0]
    code, err = cli("log.every=5")
    assert code == 2 and "log.every: 1 → 5; pass --allow-config-change" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()} == before
    code, err = cli("log.every=5", "--allow-config-change")
    assert code == 0, err
    assert "# changed on resume: log.every: 1 → 5" in (copy / "config.yaml").read_text()
    for name in ("gen_candidates", "pairs"):
        assert (copy / "round-1" / f"{name}.jsonl").read_text() == (run / "round-1" / f"{name}.jsonl").read_text()
    assert (copy / "summary.json").is_file()
