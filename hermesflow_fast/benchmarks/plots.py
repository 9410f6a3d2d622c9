"""PNG plots of benchmark rows: lines of a sweep (y vs x, log-x, one line per provider, q20–q80 shaded) and bars.

By default only the rows of the latest run's commit and device are drawn (the newest timestamp decides); where one
series has several points at the same x (re-runs), the newest wins. Lines are labelled with the dtype and the shape
keys too when those vary within the selection.

    python -m hermesflow_fast.benchmarks.plots bench/results/logprobs.csv   # -> bench/plots/logprobs_time.png, ...
    python -m hermesflow_fast.benchmarks.plots /tmp/x.csv --outdir /tmp/plots --all
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from hermesflow_fast.benchmarks.records import output_dirs, read_rows

FILE_SUFFIX = {"time": "time", "memory_extra": "memory"}
LABEL_KEYS = ("dtype", "H", "V", "D", "loss_type")  # not seq: it shrinks with T_policy below 2·seq
MARKERS = "osD^v<>px*h"
METRIC_LABELS = {"time": "time", "memory_extra": "extra memory"}

__all__ = ["plot_bars", "plot_lines", "select"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _config(row: dict) -> dict:
    return json.loads(row["extra_benchmark_config_str"] or "{}")


def select(
    rows: list[dict], commit: str | None = None, device: str | None = None, all_rows: bool = False
) -> list[dict]:
    """Rows of one commit + device: the given ones, else those of the newest row (or every row with all_rows)."""
    if not rows or all_rows:
        return rows
    newest = max(rows, key=lambda r: r["timestamp"])
    commit = commit or newest["commit"]
    device = device or newest["device_name"]
    return [r for r in rows if r["commit"] == commit and r["device_name"] == device]


def _series(rows: list[dict], panel: str | None) -> dict[tuple[str, str], list[tuple[float, float, float, float]]]:
    """{(panel value, series label): sorted (x, y50, y20, y80)}; the newest row wins at a repeated point."""
    cfgs = [_config(r) for r in rows]
    for r, c in zip(rows, cfgs, strict=True):
        c["kernel"] = r["kernel_name"]
    keys = ("kernel",) + LABEL_KEYS
    varying = [k for k in keys if k != panel and len({str(c.get(k)) for c in cfgs}) > 1]
    newest: dict[tuple[str, str, float], dict] = {}
    for r, c in zip(rows, cfgs, strict=True):
        extra = ", ".join(f"{k}={c[k]}" for k in varying if k in c)
        label = f"{r['kernel_provider']} ({extra})" if extra else r["kernel_provider"]
        key = (str(c.get(panel, "")) if panel else "", label, float(r["x_value"]))
        if key not in newest or r["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = r
    out: dict[tuple[str, str], list] = defaultdict(list)
    for (pv, label, x), r in newest.items():
        out[(pv, label)].append((x, float(r["y_value_50"]), float(r["y_value_20"]), float(r["y_value_80"])))
    return {k: sorted(v) for k, v in out.items()}


def plot_lines(rows: list[dict], path: str | Path, metrics: Sequence[str] | None = None, panel: str | None = None,
               title: str | None = None) -> Path | None:
    """One PNG: a row of panels per metric, a column per value of the config key ``panel`` (one column without),
    y against x (log-x), one line per provider. Returns the path, or None when no row has one of the metrics."""
    metrics = [m for m in (metrics or dict.fromkeys(r["metric_name"] for r in rows))
               if any(r["metric_name"] == m for r in rows)]
    if not metrics:
        return None
    rows = [r for r in rows if r["metric_name"] in metrics]
    pvals = sorted({str(_config(r).get(panel, "")) for r in rows}, key=_num) if panel else [""]
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), len(pvals), figsize=(max(8, 4.2 * len(pvals)), 5 * len(metrics)),
                             squeeze=False)
    for i, metric in enumerate(metrics):
        mrows = [r for r in rows if r["metric_name"] == metric]
        series = _series(mrows, panel)
        labels = sorted({label for _, label in series})
        colors = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
        for j, pv in enumerate(pvals):
            ax = axes[i][j]
            values = []
            for k, label in enumerate(labels):
                pts = series.get((pv, label))
                if not pts:
                    continue
                xs, y50, y20, y80 = zip(*pts, strict=True)
                values += y50
                ax.plot(xs, y50, marker=MARKERS[k % len(MARKERS)], color=colors[k % len(colors)], label=label)
                ax.fill_between(xs, y20, y80, alpha=0.2, color=colors[k % len(colors)])
            ax.set_xscale("log", base=2)
            if values and all(v > 0 for v in values):
                ax.set_yscale("log")
            elif values:  # a memory growth of 0 (or RSS noise below it): linear near 0, log above
                ax.set_yscale("symlog", linthresh=0.1)
            ax.set_xlabel(mrows[0]["x_name"])
            ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} ({mrows[0]['metric_unit']})")
            if panel:
                ax.set_title(f"{panel} = {pv}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=8)
    first = rows[0]
    cfgs = [_config(r) for r in rows]
    same = {k: cfgs[0][k] for k in ("dtype", "H", "V", "N", "seq", "threads")
            if k in cfgs[0] and len({str(c.get(k)) for c in cfgs}) == 1}
    kernels = "/".join(sorted({r["kernel_name"] for r in rows}))
    head = title or f"{kernels} {first['kernel_operation_mode']}: {', '.join(metrics)}"
    head += f"\n{first['device_name']} · {first['commit']} · torch {first['torch_version']}"
    shape = ", ".join(f"{k}={v}" for k, v in same.items())
    fig.suptitle(head + (f"\n{shape}" if shape else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_bars(rows: list[dict], path: str | Path, panels: Sequence[tuple[str, str, str]],
              order: Sequence[str] | None = None, colors: dict[str, str] | None = None, baseline: str | None = None,
              title: str | None = None) -> Path:
    """One PNG of bars, one panel per (kernel, metric, y label) of ``panels``, one bar per provider of the newest
    run (its rows share the newest row's timestamp, to the hour); ``baseline``: each bar annotated with its ratio
    to that provider's bar. A panel with no rows is hidden."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    default = ["#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd"]
    for ax, (kernel, metric, label) in zip(axes[0], panels, strict=True):
        rs = [r for r in rows if r["kernel_name"] == kernel and r["metric_name"] == metric]
        if not rs:
            ax.set_visible(False)
            continue
        newest = max(r["timestamp"] for r in rs)
        by = {r["kernel_provider"]: r for r in rs if r["timestamp"][:13] == newest[:13]}
        names = [n for n in (order or by) if n in by]
        vals = [float(by[n]["y_value_50"]) for n in names]
        bars = ax.bar(names, vals, color=[(colors or {}).get(n, default[i % len(default)])
                                          for i, n in enumerate(names)])
        if baseline in by:
            base = float(by[baseline]["y_value_50"])
            for b, v in zip(bars, vals, strict=True):
                text = f"{v / base:.2f}×" if base else "n/a"  # a baseline of 0 (e.g. no extra memory) has no ratio
                ax.annotate(text, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{kernel} ({by[names[0]]['device_name']}, {by[names[0]]['commit']})", fontsize=9)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path: str | Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _num(v: str) -> tuple:
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def main(argv: list[str] | None = None, prog: str = "python -m hermesflow_fast.benchmarks.plots") -> list[Path]:
    """One PNG per metric of a results CSV: <outdir>/<csv stem>_<time|memory|metric>.png."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="a CSV written by a benchmark (e.g. bench/results/logprobs.csv)")
    ap.add_argument("--outdir", default=None, help="where the PNGs go (default bench/plots in a checkout, else "
                                                    "bench-results)")
    ap.add_argument("--all", action="store_true", help="every row, not only the latest commit + device")
    ap.add_argument("--commit", default=None, help="rows of this commit (default: the latest run's)")
    ap.add_argument("--device", default=None, help="rows of this device_name (default: the latest run's)")
    cfg = ap.parse_args(argv)
    rows = select(read_rows(cfg.csv), cfg.commit, cfg.device, cfg.all)
    if not rows:
        raise SystemExit(f"{cfg.csv}: no rows to plot (check --commit/--device)")
    outdir = Path(cfg.outdir) if cfg.outdir else output_dirs()[1]
    stem = Path(cfg.csv).stem
    written = []
    for metric in dict.fromkeys(r["metric_name"] for r in rows):
        out = outdir / f"{stem}_{FILE_SUFFIX.get(metric, metric)}.png"
        if plot_lines(rows, out, [metric]):
            print(f"wrote {out}")
            written.append(out)
    return written


if __name__ == "__main__":
    main()
