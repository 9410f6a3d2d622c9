"""Smoke test of experiments/oracle_trainer.py at tiny sizes: both arms run from the shipped base (the t2i pretraining
loop and the real Trainer with a multi-mask per-slot estimator), and one row per arm lands in the CSV with its
settings."""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # experiments/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from experiments import oracle_trainer  # noqa: E402
from hermesflow_fast.benchmarks import harness  # noqa: E402


def test_estimator_spec_sets_the_trainer_keys(tmp_path):
    args = argparse.Namespace(
        seed=3, model=None, token_budget=512, beta=0.01, rpo_alpha=1.0, lr=1e-4, batch=4, steps=7, text_dropout=0.1,
        warmup_ratio=0.0)
    t = oracle_trainer.train_config(args, "4:mean:0.2-0.9", tmp_path, 16).train
    assert (t.gen_masks, t.gen_logp, t.gen_mask_ratio, t.und_coeff, t.max_steps) == (4, "mean", [0.2, 0.9], 0.0, 7)
    t = oracle_trainer.train_config(args, "1:sum", tmp_path, 16).train
    assert (t.gen_masks, t.gen_logp, t.gen_mask_ratio, t.rpo_alpha, t.beta) == (1, "sum", [0.0, 1.0], 1.0, 0.01)


def test_tiny_run_writes_one_row_per_arm(tmp_path):
    out = tmp_path / "oracle_trainer.csv"
    threads = torch.get_num_threads()
    try:
        res = oracle_trainer.main(["--records", "6", "--steps", "2", "--batch", "3", "--heldout", "3",
                                   "--eval-seeds", "0", "--sample-steps", "2", "--estimator", "2:mean",
                                   "--token-budget", "512", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert list(res) == ["base", "pretrain t2i", "trainer 2:mean"]
    rows = harness.read_rows(out)
    assert [r["kernel_provider"] for r in rows] == list(res)
    assert [int(r["x_value"]) for r in rows] == [0, 2, 2]
    assert all(0.0 <= float(r["y_value_50"]) <= 1.0 and r["metric_name"] == "gen" for r in rows)
    cfg = json.loads(rows[2]["extra_benchmark_config_str"])
    assert cfg["pairs"] == "gt" and cfg["n_pairs"] == 6 and cfg["heldout"] == 3
    assert cfg["beta"] == 0.01 and cfg["rpo_alpha"] == 1.0
    assert cfg["nll_first"] > 0 and cfg["image_tokens"] > 0 and cfg["eval_seeds"] == [0]


def test_judge_pairs_of_a_round_train_through_the_trainer(tmp_path):
    """--pairs judge: the judge's best (here the render itself) vs worst (random codes) candidate of each record."""
    from hermesflow_fast.world import make_records
    from hermesflow_fast.world.evaluate import encode_records
    from hermesflow_fast.world.shipped import load_base

    wm = load_base()
    recs = make_records(3, 0, "train")
    real = encode_records(wm, recs)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, wm.vocab.num_image_codes, real.shape, generator=g)
    rd = tmp_path / "round-1"
    rd.mkdir()
    (rd / "gen_candidates.jsonl").write_text("".join(
        json.dumps({"id": r.id, "images": [real[i].tolist(), noise[i].tolist()]}) + "\n" for i, r in enumerate(recs)))
    (rd / "gen_scores.jsonl").write_text("".join(
        json.dumps({"id": r.id, "accuracy": [1.0, 0.0]}) + "\n" for r in recs))
    pairs, info = oracle_trainer.judge_pairs(wm, rd, 0, 0.6)
    assert len(pairs) == 3 and info["judge_chosen"] > info["judge_rejected"]
    assert all(torch.equal(p.image_chosen_codes, real[i]) for i, p in enumerate(pairs))
    threads = torch.get_num_threads()
    try:
        res = oracle_trainer.main(["--pairs", "judge", "--round-dir", str(rd), "--arms", "trainer", "--steps", "1",
                                   "--batch", "3", "--heldout", "2", "--eval-seeds", "0", "--sample-steps", "2",
                                   "--token-budget", "512", "--out", ""])
    finally:
        torch.set_num_threads(threads)
    assert list(res) == ["base", "trainer 1:sum"] and res["trainer 1:sum"]["n_pairs"] == 3
