"""Real-data records for self-play (selfplay/sources.py): a tiny folder of PNGs drawn from the shapes world, a
records JSONL and a TIFA question file; records load and encode in file order, every bad input names file, line and
id (strict raises, non-strict skips and counts), and the curation stages run end to end on the shipped base with the
embedding scorers of a tiny BERT (the ``bert_dir`` fixture of conftest.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hermesflow_fast.selfplay.config import SelfPlayConfig, check_data
from hermesflow_fast.selfplay.record_source import world_curation_records
from hermesflow_fast.selfplay.sources import fit_image, load_real_records, read_real_records
from hermesflow_fast.train.config import ConfigError, load_config
from hermesflow_fast.world import make_records

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = ["rec-c", "rec-a", "rec-b"]  # not sorted: file order must win


@pytest.fixture(scope="module")
def wm():
    from hermesflow_fast.world.shipped import load_base

    return load_base()


@pytest.fixture(scope="module")
def world():
    return make_records(3, seed=0)


def make_folder(root: Path, world, sizes=(32, 64, (48, 32))) -> Path:
    """root/records.jsonl + root/images/*.png + root/questions.json; returns the records file."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, questions = [], []
    for rid, rec, size in zip(IDS, world, sizes):
        h, w = (size, size) if isinstance(size, int) else size
        img = Image.fromarray(rec.render(32)).resize((w, h), Image.Resampling.NEAREST)
        img.save(root / "images" / f"{rid}.png")
        row = {"id": rid, "image": f"images/{rid}.png", "caption": rec.caption}
        if rid != "rec-a":
            row["prompt"] = rec.prompt.upper()  # a prompt of its own (rec-a: defaults to the caption)
        rows.append(row)
        questions += [{"id": rid, "question": q.text, "choices": list(q.choices), "answer": q.answer,
                       "element_type": q.category} for q in rec.questions]
    questions.append({"id": "not-a-record", "question": "is it?", "choices": ["yes", "no"], "answer": "yes"})
    (root / "questions.json").write_text(json.dumps(questions))
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_records_load_and_encode_in_file_order(wm, world, tmp_path):
    path = make_folder(tmp_path, world)
    said: list[str] = []
    recs = load_real_records(path, tmp_path / "questions.json", wm.image_tokenizer, strict=True, batch_size=2,
                             log=said.append)
    assert [r.id for r in recs] == IDS
    assert [r.truth for r in recs] == [w.caption for w in world]
    assert recs[1].prompt == world[1].caption and recs[0].prompt == world[0].prompt.upper()
    assert [len(r.questions) for r in recs] == [len(w.questions) for w in world]
    assert recs[0].questions[0].prompt == world[0].questions[0].prompt  # worded as the world's self-VQA
    n = wm.num_image_tokens
    assert all(r.image_codes.shape == (n,) and r.image_codes.dtype == torch.int64 for r in recs)
    # a 32×32 PNG is untouched: the same codes as the world's own curation records; 64×64 (nearest ×2) resizes back
    ref = world_curation_records(wm, world)
    assert torch.equal(recs[0].image_codes, ref[0].image_codes)
    assert (recs[1].image_codes == ref[1].image_codes).float().mean() > 0.8
    assert any("not-a-record" in m for m in said)  # extra questions are ignored, and said so


def test_fit_image_resizes_the_short_side_and_centre_crops():
    im = Image.fromarray(np.arange(40 * 80 * 3, dtype=np.uint8).reshape(40, 80, 3))
    out = fit_image(im, (32, 32))
    assert out.size == (32, 32)
    assert fit_image(out, (32, 32)) is out


def _break(kind: str, root: Path, path: Path) -> tuple[int, str, str]:
    """Make one kind of bad input on line 2 (id rec-a); returns (line, id, what the message says)."""
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    if kind == "missing image":
        (root / row["image"]).unlink()
    elif kind == "unreadable image":
        (root / row["image"]).write_bytes(b"not a png at all")
    elif kind == "grayscale image":
        Image.open(root / row["image"]).convert("L").save(root / row["image"])
    elif kind == "missing key":
        del row["caption"]
    elif kind == "duplicate id":
        row["id"] = "rec-c"
    elif kind == "no questions":
        qs = json.loads((root / "questions.json").read_text())
        (root / "questions.json").write_text(json.dumps([q for q in qs if q["id"] != "rec-a"]))
    elif kind == "not json":
        lines[1] = lines[1][:-3]
        path.write_text("\n".join(lines) + "\n")
        return 2, "", "not valid JSON"
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    says = {"missing image": "missing image", "unreadable image": "unreadable image",
            "grayscale image": "unusable image", "missing key": "missing caption", "duplicate id": "repeated id",
            "no questions": "record without questions"}[kind]
    return 2, row["id"], says


BAD = ["missing image", "unreadable image", "grayscale image", "missing key", "duplicate id", "no questions",
       "not json"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_names_file_line_and_id(kind, wm, world, tmp_path):
    path = make_folder(tmp_path, world)
    line, rid, says = _break(kind, tmp_path, path)
    where = f"{path}:line {line}" + (f" (id {rid!r})" if rid else "")
    with pytest.raises(ValueError) as err:
        load_real_records(path, tmp_path / "questions.json", wm.image_tokenizer, strict=True, batch_size=32,
                          log=lambda m: None)
    assert says in str(err.value) and where in str(err.value)
    said: list[str] = []
    recs = load_real_records(path, tmp_path / "questions.json", wm.image_tokenizer, strict=False, batch_size=32,
                             log=said.append)
    assert [r.id for r in recs] == ["rec-c", "rec-b"]
    assert any("kept 2 of 3 records; skipped 1" in m and says in m and where in m for m in said), said


def test_problems_of_every_phase_are_counted_once_and_numeric_ids_join(wm, world, tmp_path):
    path = make_folder(tmp_path, world)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    (tmp_path / rows[0]["image"]).unlink()  # rec-c: missing image (read phase)
    qs = [q for q in json.loads((tmp_path / "questions.json").read_text()) if q["id"] != "rec-a"]
    rows[2]["id"] = 7  # rec-b → 7, its questions too
    (tmp_path / "questions.json").write_text(json.dumps([{**q, "id": 7} if q["id"] == "rec-b" else q for q in qs]))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"1 missing image .*line 1 \(id 'rec-c'\)") as err:
        load_real_records(path, tmp_path / "questions.json", wm.image_tokenizer, strict=True, batch_size=32,
                          log=lambda m: None)
    assert "without questions" not in str(err.value)  # strict stops before the question file is read
    said: list[str] = []
    recs = load_real_records(path, tmp_path / "questions.json", wm.image_tokenizer, strict=False, batch_size=32,
                             log=said.append)
    assert [r.id for r in recs] == ["7"] and len(recs[0].questions) == len(world[2].questions)
    skipped = [m for m in said if "skipped" in m]
    assert len(skipped) == 1 and "kept 1 of 3 records; skipped 2" in skipped[0]
    assert "(id 'rec-c')" in skipped[0] and "(id 'rec-a')" in skipped[0]


def test_empty_or_hopeless_files_are_errors_even_when_not_strict(wm, world, tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("\n\n")
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"records\.jsonl: no records \(the file is empty\)"):
            read_real_records(path, strict=strict)
    path.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"no usable records left; 1 missing image, caption .*line 1 \(id 'x'\)"):
        read_real_records(path, strict=False)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_real_records(tmp_path / "nope.jsonl")


def test_config_data_section_rules(tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "configs" / "selfplay-real.yaml"
    assert recipe.read_text().startswith("# hermesflow selfplay --config configs/selfplay-real.yaml")
    with pytest.raises(ConfigError, match="'data.records' = 'path/to/real/records.jsonl' does not exist"):
        check_data(load_config(recipe, [], schema=SelfPlayConfig))
    (tmp_path / "r.jsonl").write_text("")
    with pytest.raises(ConfigError, match="'data.questions' is required"):
        check_data(load_config(None, [f"data.records={tmp_path / 'r.jsonl'}"], schema=SelfPlayConfig))
    with pytest.raises(ConfigError, match="'data.scorer_model' is set but 'data.records' is not"):
        check_data(load_config(None, ["data.scorer_model=/m"], schema=SelfPlayConfig))
    with pytest.raises(ConfigError, match="scorer_kind"):
        load_config(None, ["data.scorer_kind=glove"], schema=SelfPlayConfig)
    check_data(load_config(None, [], schema=SelfPlayConfig))  # the shapes world: nothing to check


def real_overrides(root: Path, bert: Path) -> list[str]:
    return [f"data.records={root / 'records.jsonl'}", f"data.questions={root / 'questions.json'}",
            f"data.scorer_model={bert}", "data.scorer_kind=bert-cls", "curation.caption_grid=[[1,0.0],[3,0.7]]",
            "curation.images_per_prompt=2", "curation.steps=2", "curation.batch_size=2", "curation.caption_tokens=8",
            "train.batch_size=4", "log.progress=false"]


@pytest.fixture(scope="module")
def curated(world, bert_dir, tmp_path_factory):
    """Round 1 of a real-data run, stopped after the pairs."""
    from hermesflow_fast.selfplay.rounds import run_selfplay

    root = tmp_path_factory.mktemp("real")
    make_folder(root, world)
    cfg = load_config(None, real_overrides(root, bert_dir), schema=SelfPlayConfig)
    said: list[str] = []
    res = run_selfplay(cfg, root / "run", rounds=1, log=said.append, stop_after="pairs")
    return root, cfg, res, said


def test_curation_stages_run_end_to_end_on_real_records(curated):
    root, _, res, said = curated
    rd = root / "run" / "round-1"
    for stage in ("und_candidates", "und_scores", "gen_candidates", "gen_scores"):
        rows = [json.loads(x) for x in (rd / f"{stage}.jsonl").read_text().splitlines()]
        assert [x["id"] for x in rows] == IDS, stage
        assert (rd / f"{stage}.done").is_file()
    scores = [json.loads(x)["scores"] for x in (rd / "und_scores.jsonl").read_text().splitlines()]
    assert all(len(s) == 2 and all(-1.0001 <= v <= 1.0001 for v in s) for s in scores)  # cosines
    acc = [json.loads(x)["accuracy"] for x in (rd / "gen_scores.jsonl").read_text().splitlines()]
    assert all(len(a) == 2 and all(0 <= v <= 1 for v in a) for a in acc)
    pairs = [json.loads(x) for x in (rd / "pairs.jsonl").read_text().splitlines()]
    assert {p["id"] for p in pairs} <= set(IDS)
    for p in pairs:
        assert set(p) <= {"id", "prompt", "und", "gen"} and ("und" in p or "gen" in p)
        for side in ("und", "gen"):
            if side in p:
                assert set(p[side]) == {"chosen", "rejected", "scores"} and p[side]["scores"][0] > p[side]["scores"][1]
    stats = json.loads((rd / "stats.json").read_text())
    for side in ("und", "gen"):
        assert stats[side]["kept"] + sum(stats[side]["dropped"].values()) == 3
    base = json.loads((root / "run" / "round-0" / "eval.json").read_text())
    assert base["und"] is None and base["gap"] is None and "judge" in base["skipped"]
    assert res == [dict(round=0, **base)]
    assert any("held-out evaluation skipped" in m for m in said)
    assert not (rd / "train").exists()


def test_real_round_trains_and_reports_without_scores(curated):
    """--resume finishes the round: Pair-DPO on the real pairs, the eval stage skipped (null scores), the report."""
    from hermesflow_fast.selfplay.report import format_table
    from hermesflow_fast.selfplay.rounds import run_selfplay

    root, cfg, _, _ = curated
    res = run_selfplay(cfg, root / "run", rounds=1, resume=True, log=lambda m: None)
    rd = root / "run" / "round-1"
    assert (rd / "model" / "model.safetensors").is_file() and (rd / "eval.done").is_file()
    assert [r["round"] for r in res] == [0, 1] and res[1]["und"] is None
    assert "| 1 | n/a | n/a | n/a | n/a |" in format_table(res)
    report = (root / "run" / "report.md").read_text()
    assert "Held-out evaluation skipped" in report and not (root / "run" / "gap.png").exists()
    diag = res[1]["diagnostics"]  # no judge: self-VQA's figures, and what is missing said
    assert diag["categories"]["all"]["judge"] is None and diag["categories"]["all"]["self_vqa"]["pass_at_m"] is not None
    assert "no judge, real data (data.records=" in diag["unavailable"][0] and "Self-consistency" in report
