"""Smoke tests of the self-play experiments at tiny sizes: the ablation's three arms differ only in their generation
pairs (the understanding pairs and everything else stay), each arm trains and is evaluated through the real pipeline;
the sampler headroom's rows land in their CSV."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # experiments/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from experiments import sampler_headroom, selfplay_ablation  # noqa: E402
from hermesflow_fast.benchmarks import harness  # noqa: E402

TINY = ["world.train_records=12", "world.heldout_records=6", "curation.images_per_prompt=3", "eval.seeds=2",
        "eval.steps=2", "curation.steps=2", "curation.caption_grid=[[1,0.0],[2,0.7]]"]


def wm_for_test():
    from hermesflow_fast.world.shipped import load_base

    return load_base()


def _pairs(path: Path) -> dict[str, dict]:
    return {p["id"]: p for p in map(json.loads, path.read_text().splitlines())}


def test_ablation_arms_differ_only_in_generation_pairs(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = selfplay_ablation.main(["--seeds", "1", "--threads", "1", "--work", str(tmp_path / "w"),
                                      "--out", str(tmp_path / "a.csv"), *TINY])
    finally:
        torch.set_num_threads(threads)
    assert list(res) == ["base/1", "self/1", "random/1", "judge/1"]
    cur = _pairs(tmp_path / "w" / "seed1-curated" / "round-1" / "pairs.jsonl")
    arms = {a: _pairs(tmp_path / "w" / f"seed1-{a}" / "round-1" / "pairs.jsonl") for a in ("self", "random", "judge")}
    assert arms["self"] == cur  # the round's own pairs, untouched
    for arm in ("random", "judge"):
        for pid, p in arms[arm].items():
            if "und" in p or pid in cur and "und" in cur[pid]:
                assert p.get("und") == cur[pid].get("und")
    cands = {c["id"]: c["images"] for c in map(json.loads, (tmp_path / "w" / "seed1-curated" / "round-1" /
                                                             "gen_candidates.jsonl").read_text().splitlines())}
    rand = [p for p in arms["random"].values() if "gen" in p]
    assert {p["id"] for p in rand} == {p["id"] for p in cur.values() if "gen" in p}  # same records, same budget
    assert all(p["gen"]["chosen"] in cands[p["id"]] and p["gen"]["rejected"] in cands[p["id"]] for p in rand)
    for arm in ("self", "random", "judge"):
        assert (tmp_path / "w" / f"seed1-{arm}" / "round-1" / "model" / "config.json").is_file()
        assert len(res[f"{arm}/1"]["gen_seeds"]) == 2
    # the judge reads the candidates against the run's world (world.seed 0), whatever the training seed; another
    # world's records are refused, not silently judged against the wrong questions
    with pytest.raises(SystemExit, match="not the round's world"):
        selfplay_ablation.rewrite_pairs(tmp_path / "w" / "seed1-judge" / "round-1", "judge", wm_for_test(), 7, 1, 0.6)
    rows = harness.read_rows(tmp_path / "a.csv")
    assert [r["kernel_provider"] for r in rows] == ["base", "self", "random", "judge"]
    cfg = json.loads(rows[3]["extra_benchmark_config_str"])
    assert cfg["judge_chosen"] > cfg["judge_rejected"] and cfg["train_seed"] == 1 and rows[0]["x_value"] == "1"


def test_sampler_headroom_rows(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = sampler_headroom.main(["--records", "6", "--images", "2", "--setting", "2:0.0:30.0", "--threads", "1",
                                     "--out", str(tmp_path / "s.csv")])
    finally:
        torch.set_num_threads(threads)
    out = res["2:0.0:30.0"]
    assert out["all"][2] == 6 and all(0 <= p1 <= pm <= 1 for p1, pm, _ in out.values())
    rows = harness.read_rows(tmp_path / "s.csv")
    assert {r["x_value"] for r in rows} == set(out)
