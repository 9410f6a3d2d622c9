"""Smoke test of bench/bench_generate.py at tiny sizes: both kinds run, check their outputs, write rows and a plot."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import bench_generate  # noqa: E402
from hermesflow_fast.benchmarks import harness  # noqa: E402


def test_generate_bench_writes_rows_and_plot(tmp_path):
    out, png = tmp_path / "generate.csv", tmp_path / "generate.png"
    argv = ["all", "--d", "32", "--layers", "1", "--heads", "2", "--prefix", "8", "--question", "3", "--new", "5",
            "--batch", "2", "--grid", "2", "--codes", "16", "--text-len", "6", "--steps", "2", "--prompts", "2",
            "--images", "2", "--reps", "1", "--warmup", "0", "--out", str(out), "--plot", str(png)]
    rows = bench_generate.main(argv)
    assert {r["kernel_provider"] for r in rows} == {"original", "recompute", "kv_cache", "kv_cache_batched", "two_pass",
                                                    "batched_cfg", "ours"}
    assert len(harness.read_rows(out)) == 7 and png.stat().st_size > 0
    assert all(float(r["y_value_50"]) > 0 for r in rows)
