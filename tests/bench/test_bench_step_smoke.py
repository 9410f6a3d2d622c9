"""Smoke test of bench/bench_step.py at a toy size: the loss check (HermesFlow-style step, +packing and ours agree on
one batch, and it catches HermesFlow's whole-batch sums), every provider's CSV rows, the plot, one fresh-process worker.

    python -m pytest -q tests/bench/test_bench_step_smoke.py
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import bench_step, hermesflow_step  # noqa: E402
from hermesflow_fast.benchmarks import harness  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = dict(d=32, layers=1, heads=2, pairs=2, image_size=32, text_len=16, text_vocab=200, code_bits=5, vq_ch=8)
TOY_ARGS = [a for k, v in TOY.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def toy():
    p = bench_step.Problem(**TOY)
    return p, bench_step.build_world(p)


def test_check_agrees_and_catches_batch_sums(toy, monkeypatch):
    p, w = toy
    losses = bench_step.check_losses(p, world=w)
    assert set(losses) == {"hermesflow", "+packing", "+fused_head"}
    assert max(losses.values()) - min(losses.values()) <= 1e-4 * losses["hermesflow"]
    whole = hermesflow_step._gather_sum
    # the original's whole-batch sum switched on (docs/differences.md): the log-probs summed over the whole batch,
    # the same sum for every pair
    monkeypatch.setattr(hermesflow_step, "_gather_sum",
                        lambda logp, labels: whole(logp, labels).sum().expand(labels.shape[0]))
    with pytest.raises(AssertionError, match="disagree"):
        bench_step.check_losses(p, world=w)


def test_step_bench_rows_and_plot(tmp_path):
    out, png = tmp_path / "step.csv", tmp_path / "step.png"
    results = bench_step.main(TOY_ARGS + ["--reps", "1", "--warmup", "0", "--inprocess", "--threads", "1",
                                          "--out", str(out), "--plot", str(png)])
    names = ["hermesflow", "+token_cache", "+packing", "+fused_head"]
    assert [r["provider"] for r in results] == names  # +compile is off on CPU unless --compile
    rows = harness.read_rows(out)
    assert {(r["kernel_provider"], r["metric_name"]) for r in rows} == {
        (n, m) for n in names for m in ("pairs_per_s", "memory_extra")}
    for r in rows:
        assert r["x_name"] == "pairs" and float(r["x_value"]) == 2 and r["dtype"] == "fp32"
        assert r["machine"] and r["commit"] and r["timestamp"]
        cfg = json.loads(r["extra_benchmark_config_str"])
        assert (cfg["d"], cfg["layers"], cfg["N"], cfg["row_len"], cfg["V"]) == (32, 1, 4, 23, 200 + 10 + 32 + 1)
        if r["metric_name"] == "pairs_per_s":
            assert 0 < float(r["y_value_20"]) <= float(r["y_value_50"]) <= float(r["y_value_80"])
    work = {r["provider"]: r["work"] for r in results}
    assert work["hermesflow"]["tokens"] == 2 * 2 * 2 * 23  # win + lose, 2B rows of T each
    assert work["+packing"]["tokens"] < work["hermesflow"]["tokens"]  # no pads, shared prefixes
    assert work["+fused_head"]["head_rows"] < work["+packing"]["head_rows"]  # the head on target rows only
    assert png.stat().st_size > 0


def test_fresh_process_worker(toy):
    p, _ = toy
    r = bench_step.measure_in_subprocess(p, "+fused_head", reps=1, warmup=0, threads=1, timeout=120)
    assert r["provider"] == "+fused_head" and r["time"][0] > 0 and r["mem_extra"] >= 0 and r["loss"] > 0
