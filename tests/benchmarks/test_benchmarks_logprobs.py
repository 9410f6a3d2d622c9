"""Smoke test of hermesflow_fast.benchmarks.logprobs at tiny shapes: the sweep, its CSV, the table, the worker
process, --grid --plan, and bench.table over its rows.

    python -m pytest -q tests/benchmarks
"""

import json
import sys
from pathlib import Path

import pytest

from hermesflow_fast.benchmarks import harness
from hermesflow_fast.benchmarks import logprobs as bl

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder of the checkout, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import table  # noqa: E402


def _available(names):
    return [n for n in names if bl.provider_available(n)[0]]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "logprobs.csv"
    argv = ["--H", "64", "--V", "500", "--tokens", "256", "--reps", "1", "--check", "--inprocess", "--out", str(out),
            "--plot-out", str(tmp / "logprobs.png")]
    return bl.main(argv), out, tmp / "logprobs.png"


def test_sweep_rows_for_every_provider(sweep):
    results, out, png = sweep
    rows = harness.read_rows(out)
    with open(out) as f:
        assert tuple(f.readline().strip().split(",")) == harness.CSV_COLUMNS
    expected = set(_available(bl.DEFAULT_PROVIDERS))
    assert {r["provider"] for r in results} == expected
    times = {r["kernel_provider"]: r for r in rows if r["metric_name"] == "time"}
    mems = {r["kernel_provider"]: r for r in rows if r["metric_name"] == "memory_extra"}
    assert set(times) == expected
    assert set(mems) == expected - set(bl.TIME_ONLY)
    for r in times.values():
        assert r["kernel_name"] == "fused_linear_dpo"
        assert r["metric_unit"] == "s" and r["x_name"] == "T_policy" and float(r["x_value"]) == 256
        assert 0 < float(r["y_value_20"]) <= float(r["y_value_50"]) <= float(r["y_value_80"])
        cfg = json.loads(r["extra_benchmark_config_str"])
        assert {"H", "V", "dtype", "pairs", "seq", "bias", "threads", "chunk_rows", "valid_tokens"} <= set(cfg)
        assert (cfg["H"], cfg["V"], cfg["pairs"], cfg["seq"], cfg["bias"]) == (64, 500, 1, 128, True)
        assert r["dtype"] == "fp32" and r["torch_version"] and r["commit"] and r["timestamp"] and r["machine"]
    for r in mems.values():
        assert r["metric_unit"] == "MB"
        float(r["y_value_50"])
    assert png.stat().st_size > 0


def test_sweep_losses_agree(sweep):
    results, _, _ = sweep
    losses = {r["provider"]: r["loss"] for r in results if r["loss"] is not None}
    assert "naive" in losses and len(losses) >= 4
    for name, value in losses.items():
        assert value == pytest.approx(losses["naive"], rel=1e-4), name


def test_table_has_ratios(sweep):
    results, _, _ = sweep
    cfg = bl.SWEEP.parse_args(["--H", "64", "--V", "500", "--tokens", "256", "--reps", "1"])
    text = bl.SWEEP.format_table(results, cfg)
    assert "×floor" in text and "gemm_floor" in text and "ours" in text and "n/a" in text and "TFLOP/s" in text


def test_worker_process_measures_memory():
    """The CPU path: one fresh process, peak RSS via /proc/self/clear_refs, JSON back on stdout."""
    p = bl.Problem.make(tokens=256, seq=256, H=64, V=500)
    r = bl.SWEEP.measure_in_subprocess(p, "ours", reps=1, warmup=1, threads=1, timeout=120)
    assert r["time"][0] > 0 and r["loss"] > 0
    assert r["mem_growth"] is not None and r["grad_bytes"] == (256 * 64 + 500 * 64 + 500) * 4
    assert r["mem_extra"] == r["mem_growth"] - r["grad_bytes"]


def test_problem_shapes_and_flag_errors(capsys):
    assert bl.Problem.make(2048, 256, 8, 16).pairs == 4
    assert bl.Problem.make(256, 256, 8, 16).seq == 128  # one pair of shorter sequences
    with pytest.raises(ValueError, match="multiple"):
        bl.Problem.make(768, 256, 8, 16)
    with pytest.raises(SystemExit):
        bl.main(["--tokens", "768"])
    assert "multiple of 2·seq" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bl.main(["--providers", "nope"])
    assert "unknown providers" in capsys.readouterr().err


def test_presets_fill_what_is_not_given():
    cfg = bl.SWEEP.parse_args(["--quick", "--reps", "5"])
    assert (cfg.tokens, cfg.H, cfg.V, cfg.reps) == ([512, 1024], [512], [8192], 5)
    cfg = bl.SWEEP.parse_args(["--grid", "--V", "100"])
    assert cfg.H == [1024, 2048, 4096] and cfg.V == [100] and cfg.providers == ["gemm_floor", "ours", "naive"]


def test_grid_plan_keeps_ours_under_an_eighth_of_naive(capsys):
    """--grid --plan runs nothing and prints ours' chunking at every budget-grid point: the modelled extra (largest
    chunk's logits + its gathers) is under 1/8 of naive's modelled extra from 2048 tokens up."""
    assert bl.main(["--grid", "--plan"]) == []
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln[:1] == " " and ln.split()[0].isdigit()]
    assert len(lines) == 27  # 3 H × 3 V × 3 token counts
    assert all(int(ln[2]) >= 2048 and float(ln[-1]) <= 1 / 8 for ln in lines)


def test_sweep_over_several_heads(tmp_path):
    """--H and --V take lists: one row set per head, ratios within a head only (bench.table names the head)."""
    out = tmp_path / "heads.csv"
    argv = ["--H", "16,32", "--V", "100", "--tokens", "128", "--providers", "gemm_floor,ours", "--reps", "1",
            "--inprocess", "--out", str(out)]
    results = bl.main(argv)
    assert sorted({r["problem"]["H"] for r in results}) == [16, 32] and len(results) == 4
    md = table.table(table.load(out, None))
    assert "| 16 × 100, 128 | ours |" in md and "| 32 × 100, 128 | ours |" in md
