"""PNG plots of a bench CSV: one figure per metric, y vs x (log-x), one line per provider, q20–q80 shaded.

By default only the rows of the latest run's commit and device are drawn (the newest timestamp decides); where one
provider has several points at the same x (re-runs), the newest wins. Lines are labelled with the dtype and shape
too when those vary within the selection.

    python -m bench.plot bench/results/logprobs.csv        # -> bench/plots/logprobs_time.png, logprobs_memory.png
    python -m bench.plot /tmp/x.csv --outdir /tmp/plots --all
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench import utils  # noqa: E402

FILE_SUFFIX = {"time": "time", "memory_extra": "memory"}
LABEL_KEYS = ("dtype", "H", "V", "loss_type")  # not seq: it shrinks with T_policy below 2·seq
MARKERS = "osD^v<>px*h"


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


def _series_key(row: dict, varying: tuple[str, ...]) -> str:
    cfg = json.loads(row["extra_benchmark_config_str"] or "{}")
    extra = ", ".join(f"{k}={cfg[k]}" for k in varying if k in cfg)
    name = row["kernel_provider"]
    return f"{name} ({extra})" if extra else name


def plot_metric(rows: list[dict], metric: str, path: Path) -> Path | None:
    """One figure of ``metric``; returns the path written, or None when no row has that metric."""
    rows = [r for r in rows if r["metric_name"] == metric]
    if not rows:
        return None
    kernels = sorted({r["kernel_name"] for r in rows})
    cfgs = [json.loads(r["extra_benchmark_config_str"] or "{}") for r in rows]
    varying = tuple(k for k in LABEL_KEYS if len({str(c.get(k)) for c in cfgs}) > 1)
    if len(kernels) > 1:
        varying = ("kernel",) + varying
    newest: dict[tuple[str, float], dict] = {}
    for r, c in zip(rows, cfgs, strict=True):
        c["kernel"] = r["kernel_name"]
        r = dict(r, extra_benchmark_config_str=json.dumps(c))
        key = (_series_key(r, varying), float(r["x_value"]))
        if key not in newest or r["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = r
    series: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for (label, x), r in newest.items():
        series[label].append((x, float(r["y_value_50"]), float(r["y_value_20"]), float(r["y_value_80"])))

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
    for i, label in enumerate(sorted(series)):
        pts = sorted(series[label])
        xs, y50, y20, y80 = zip(*pts, strict=True)
        (line,) = ax.plot(xs, y50, marker=MARKERS[i % len(MARKERS)], color=colors[i % len(colors)], label=label)
        ax.fill_between(xs, y20, y80, alpha=0.2, color=line.get_color())
    ax.set_xscale("log", base=2)
    values = [p[1] for pts in series.values() for p in pts]
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    first = rows[0]
    ax.set_xlabel(first["x_name"])
    ax.set_ylabel(f"{metric} ({first['metric_unit']})")
    same = {k: cfgs[0][k] for k in ("dtype", "H", "V", "seq", "threads")
            if k in cfgs[0] and len({str(c.get(k)) for c in cfgs}) == 1}
    shape = ", ".join(f"{k}={v}" for k, v in same.items())
    title = f"{'/'.join(kernels)} {first['kernel_operation_mode']}: {metric}\n"
    title += f"{first['device_name']} · {first['commit']} · torch {first['torch_version']}"
    ax.set_title(title + (f"\n{shape}" if shape else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="a CSV written by bench.bench_logprobs or bench.bench_dpo")
    ap.add_argument("--outdir", default=str(utils.PLOTS_DIR), help="where the PNGs go (default bench/plots)")
    ap.add_argument("--all", action="store_true", help="every row, not only the latest commit + device")
    ap.add_argument("--commit", default=None, help="rows of this commit (default: the latest run's)")
    ap.add_argument("--device", default=None, help="rows of this device_name (default: the latest run's)")
    cfg = ap.parse_args(argv)
    rows = select(utils.read_rows(cfg.csv), cfg.commit, cfg.device, cfg.all)
    if not rows:
        raise SystemExit(f"{cfg.csv}: no rows to plot (check --commit/--device)")
    stem = Path(cfg.csv).stem
    written = []
    for metric in dict.fromkeys(r["metric_name"] for r in rows):
        out = Path(cfg.outdir) / f"{stem}_{FILE_SUFFIX.get(metric, metric)}.png"
        if plot_metric(rows, metric, out):
            print(f"wrote {out}")
            written.append(out)
    return written


if __name__ == "__main__":
    main()
