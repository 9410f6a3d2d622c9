"""The benchmark harness: a toy sweep (cartesian product, skip after a failure, rows, table, plot), the CSV format,
where results go, the printed table of rows, and the plot / table tools on the committed result CSVs."""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from hermesflow_fast.benchmarks import dpo, harness, plots

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Toy:
    n: int
    k: str
    device: str = "cpu"


def _measure(p: Toy, provider: str, reps: int, warmup: int) -> dict:
    if provider == "fragile" and p.n >= 4:
        raise RuntimeError("out of memory (pretend)")
    return {"time": [0.001 * p.n, 0.0009 * p.n, 0.0011 * p.n], "mem_extra": 2**20 * p.n if provider == "b" else None,
            "peak_reset": True}


TOY = harness.Sweep(
    name="toy", module=__name__, doc="a toy sweep", kernel=lambda pt: f"toy_{pt['k']}",
    axes=[harness.Axis("k", ("x", "y"), "kinds", type=str), harness.Axis("n", (8, 2, 4), "sizes", column="size")],
    providers=("a", "b", "fragile"), problem_type=Toy, problem=lambda pt, cfg: Toy(pt["n"], pt["k"]),
    measure=_measure, ratios=[harness.Ratio("×a", "a")],
    columns=[harness.Column("twice", lambda r: str(2 * r["point"]["n"]))],
    config=lambda r, cfg: {"extra": 1}, panel="k",
)


def test_toy_sweep_rows_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "toy.csv", tmp_path / "toy.png"
    results = TOY.main(["--out", str(out), "--plot-out", str(png), "--reps", "1"])
    said = capsys.readouterr().out
    # every (k, n, provider), n ascending within k; fragile failed at n=4 and was skipped at n=8 of the same k
    assert [(r["point"]["k"], r["point"]["n"], r["provider"]) for r in results] == [
        (k, n, p) for k in "xy" for n in (2, 4, 8) for p in ("a", "b", "fragile") if p != "fragile" or n == 2]
    assert "FAILED fragile at k=x n=4" in said and "skip fragile at k=x n=8" in said
    rows = harness.read_rows(out)
    assert len(rows) == len(results) + sum(r["provider"] == "b" for r in results)  # + b's memory rows
    r = next(r for r in rows if r["kernel_provider"] == "b" and r["metric_name"] == "memory_extra")
    assert (r["kernel_name"], r["x_name"], r["metric_unit"], float(r["y_value_50"])) == ("toy_x", "size", "MB", 2.0)
    cfg = json.loads(r["extra_benchmark_config_str"])
    assert cfg == {"k": "x", "n": 2, "dtype": "fp32", "device": "cpu", "threads": cfg["threads"], "reps": 1,
                   "warmup": 1, "peak_reset": True, "extra": 1}
    assert "×a" in said and "twice" in said and f"appended {len(rows)} rows to {out}" in said
    assert png.stat().st_size > 0


def test_output_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(out=None, results=None)
    assert harness.output_path(args, "x") == Path("bench-results/x.csv")
    assert harness.plot_path(args, "x") == Path("bench-results/x.png")
    (tmp_path / "bench" / "results").mkdir(parents=True)  # a checkout
    assert harness.output_path(args, "x") == Path("bench/results/x.csv")
    assert harness.plot_path(args, "x") == Path("bench/plots/x.png")
    assert harness.output_path(argparse.Namespace(out=None, results="r"), "x") == Path("r/x.csv")
    assert harness.output_path(argparse.Namespace(out="", results="r"), "x") is None
    assert harness.output_path(argparse.Namespace(out="a.csv", results=None), "x", Path("/b")) == Path("a.csv")
    assert harness.output_path(args, "x", Path("/b")) == Path("/b/results/x.csv")


def test_quantile_and_csv_header_guard(tmp_path):
    assert harness.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert harness.quantile([1.0, 2.0], 0.2) == pytest.approx(1.2)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        harness.append_rows(bad, [])


def test_recorder_and_rows_table(tmp_path, capsys):
    rec = harness.Recorder(tmp_path / "r.csv", kernel_name="k", x_name="n", unit="s", metric="time")
    rec.add(provider="base", x_value=1, y=(2.0, 1.5, 2.5), config={"tokens": 10})
    assert rec.flush() == 1 and rec.flush() == 0
    rec.add(provider="fast", x_value=1, y=(1.0,), config={"tokens": 7})
    rows = rec.done()
    assert f"appended 2 rows to {tmp_path / 'r.csv'}" in capsys.readouterr().out
    assert [r["kernel_provider"] for r in harness.read_rows(tmp_path / "r.csv")] == ["base", "fast"]
    text = harness.rows_table(rows, baseline="base", keys=("tokens",))
    lines = text.splitlines()
    assert "time (s)" in lines[0] and "÷base" in lines[0] and "tokens" in lines[0]
    assert lines[2].split()[-5:] == ["2", "[1.5,", "2.5]", "1.00", "10"]
    assert lines[3].split()[-3:] == ["1", "0.50", "7"]
    assert harness.Recorder(None).done() == []


def test_dpo_sweep_rows(tmp_path):
    out = tmp_path / "dpo.csv"
    results = dpo.main(["--pairs", "8,64", "--reps", "2", "--warmup", "1", "--out", str(out)])
    assert len(results) == 8 and all(r["time"][0] > 0 for r in results)
    rows = harness.read_rows(out)
    assert len(rows) == 8 and {r["kernel_name"] for r in rows} == {"dpo_loss", "pair_dpo_loss"}
    cfg = json.loads(rows[0]["extra_benchmark_config_str"])
    assert {"pairs", "loss_type", "beta", "dtype", "device", "threads", "reps"} <= set(cfg)


@pytest.mark.parametrize("name", ["logprobs", "dpo", "nearest_code", "step"])
def test_committed_results_still_plot_and_table(name, tmp_path):
    """The CSVs under bench/results (rows of older commits) read back through the plot tool; logprobs through
    bench.table too."""
    csv = ROOT / "bench" / "results" / f"{name}.csv"
    written = plots.main([str(csv), "--outdir", str(tmp_path)])
    assert written and all(p.stat().st_size > 0 for p in written)
    if name == "logprobs":
        import sys

        sys.path.insert(0, str(ROOT))
        from bench import table

        md = table.table(table.load(csv, "0ee19a8"))
        assert "| 0ee19a8 | 4096 | ours | 43.50 [42.50, 44.50] | 1.04 | 298 | 0.094 |" in md
