"""Smoke test of hermesflow_fast.benchmarks.nearest: the sweep in process at tiny sizes, its CSV, the check, the
worker process and the plot.

    python -m pytest -q tests/benchmarks/test_benchmarks_nearest.py
"""

import json

import pytest

from hermesflow_fast.benchmarks import harness
from hermesflow_fast.benchmarks import nearest as bn


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out, png = tmp / "nearest_code.csv", tmp / "nearest_code.png"
    argv = ["--N", "256", "--K", "64,512", "--D", "8,13", "--reps", "1", "--warmup", "0", "--check", "--inprocess",
            "--out", str(out), "--plot-out", str(png)]
    return bn.main(argv), out, png


def test_sweep_rows_for_every_provider(sweep):
    results, out, _ = sweep
    rows = harness.read_rows(out)
    with open(out) as f:
        assert tuple(f.readline().strip().split(",")) == harness.CSV_COLUMNS
    assert {r["provider"] for r in results} == set(bn.DEFAULT_PROVIDERS)
    assert len(results) == 4 * 2 * 2 and len(rows) == 2 * len(results)
    for r in rows:
        cfg = json.loads(r["extra_benchmark_config_str"])
        assert r["kernel_name"] == "nearest_code" and r["x_name"] == "K" and float(r["x_value"]) == cfg["K"]
        assert cfg["N"] == 256 and cfg["K"] in (64, 512) and cfg["D"] in (8, 13) and cfg["threads"] >= 1
        assert r["dtype"] == "fp32" and r["torch_version"] and r["commit"] and r["timestamp"] and r["machine"]
        if r["metric_name"] == "time":
            assert r["metric_unit"] == "s" and 0 < float(r["y_value_20"]) <= float(r["y_value_80"])
        else:
            assert r["metric_name"] == "memory_extra" and r["metric_unit"] == "MB"
            float(r["y_value_50"])


def test_table_and_plot(sweep):
    results, _, png = sweep
    cfg = bn.SWEEP.parse_args(["--N", "256", "--K", "64,512", "--D", "8,13", "--reps", "1"])
    text = bn.SWEEP.format_table(results, cfg)
    assert "×ours" in text and "cdist_argmin" in text and "onehot_full" in text
    assert png.stat().st_size > 0


def test_providers_agree():
    bn.check_providers(bn.DEFAULT_PROVIDERS)
    x, codebook = bn.build_inputs(bn.Problem(N=100, K=50, D=8))
    answers = {name: bn.as_index(fn(x, codebook)) for name, fn in bn.PROVIDERS.items()}
    for name, index in answers.items():
        assert index.shape == (100,) and int((index != answers["reference"]).sum()) <= 1, name


def test_worker_process_measures_memory():
    """The CPU path: one fresh process, peak RSS via /proc/self/clear_refs, JSON back on stdout."""
    p = bn.Problem(N=512, K=4096, D=8)
    r = bn.SWEEP.measure_in_subprocess(p, "cdist_argmin", reps=1, warmup=1, threads=1, timeout=120)
    assert r["time"][0] > 0
    assert r["mem_extra"] >= 512 * 4096 * 4 * 0.9  # the (N, K) float32 distance matrix, at least
