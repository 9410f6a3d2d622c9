"""Smoke test of bench/bench_block_mask.py: both builders give the same tiles and one time row each per size."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import bench_block_mask  # noqa: E402
from hermesflow_fast.benchmarks import harness  # noqa: E402


def test_rows_and_packed_mask(tmp_path):
    out = tmp_path / "bm.csv"
    results = bench_block_mask.main(["--tokens", "300,800", "--reps", "1", "--threads", "1", "--out", str(out)])
    assert [(r["provider"], r["point"]["tokens"]) for r in results] == [
        ("create_block_mask", 300), ("ours", 300), ("create_block_mask", 800), ("ours", 800)]
    rows = harness.read_rows(out)
    assert [(r["kernel_name"], r["x_name"], r["x_value"], r["dtype"]) for r in rows[:2]] == [
        ("block_mask", "tokens", "300", "bool")] * 2 and len(rows) == 4
    m = bench_block_mask.packed_mask(1, 800, "cpu")
    d = m.dense()[0]
    assert bool(d[200, 300]) and not bool(d[500, 300])  # inside one image block both ways; across sequences never
