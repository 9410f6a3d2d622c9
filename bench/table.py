"""Markdown table of a results CSV, the one the README quotes: time, × GEMM floor, extra memory, ÷ naive's.

    python -m bench.table bench/results/logprobs.csv [--commit SHA] [--providers ours,naive,...]

Ratios are only formed between rows of the same commit, device, dtype, head (H, V) and x (one sweep), never across
runs; when the rows hold more than one head, the tokens cell names it (H × V).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path


def load(path: Path, commit: str | None) -> list[dict[str, str]]:
    rows = list(csv.DictReader(path.open()))
    if commit:
        rows = [r for r in rows if r["commit"].startswith(commit)]
    return rows


def table(rows: list[dict[str, str]], providers: list[str] | None = None) -> str:
    cell: dict[tuple, dict[str, dict[str, str]]] = defaultdict(dict)
    order: list[str] = []
    for r in rows:
        cfg = json.loads(r["extra_benchmark_config_str"] or "{}")
        key = (r["commit"], r["device_name"], r["dtype"], int(r["x_value"]), cfg.get("H"), cfg.get("V"))
        cell[key].setdefault(r["kernel_provider"], {})[r["metric_name"]] = r
        if r["kernel_provider"] not in order:
            order.append(r["kernel_provider"])
    wanted = providers or order
    out = [
        "| commit | tokens (policy + as many reference) | provider | time, s: median [q20, q80] | × GEMM floor "
        "| extra memory, MB | ÷ naive's extra |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    heads = {k[4:] for k in cell}
    for key in sorted(cell, key=lambda k: (k[0], k[4] or 0, k[5] or 0, k[3])):
        got = cell[key]
        floor = got.get("gemm_floor", {}).get("time")
        naive_mem = got.get("naive", {}).get("memory_extra")
        for p in wanted:
            t = got.get(p, {}).get("time")
            if t is None:
                continue
            m = got[p].get("memory_extra")
            med, q20, q80 = (float(t[k]) for k in ("y_value_50", "y_value_20", "y_value_80"))
            x_floor = f"{med / float(floor['y_value_50']):.2f}" if floor else "n/a"
            mem = f"{float(m['y_value_50']):,.0f}" if m else "n/a"
            ratio = f"{float(m['y_value_50']) / float(naive_mem['y_value_50']):.3f}" if m and naive_mem else "n/a"
            time_s = f"{med:.2f} [{q20:.2f}, {q80:.2f}]"
            tokens = f"{key[4]} × {key[5]}, {key[3]}" if len(heads) > 1 else f"{key[3]}"
            out.append(f"| {key[0]} | {tokens} | {p} | {time_s} | {x_floor} | {mem} | {ratio} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--commit", default=None, help="only rows of this commit (prefix)")
    ap.add_argument("--providers", default=None, help="comma-separated providers, in this order")
    args = ap.parse_args()
    providers = args.providers.split(",") if args.providers else None
    print(table(load(args.csv, args.commit), providers))


if __name__ == "__main__":
    main()
