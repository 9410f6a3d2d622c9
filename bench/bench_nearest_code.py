"""Nearest code (VQ) by squared L2, forward only: ours vs torch.cdist + argmin, the full-matrix one-hot way, and our
chunked plain-torch twin.

Workload: x (N, D) rows to quantize against a codebook (K, D), both randn, returning the index of each row's nearest
code. N = 16384 rows by default (64 images × 256 tokens, Show-o's 16×16 token grid), K ∈ {512, 8192, 16384} codes,
D ∈ {8, 13, 256} dims per code. One timed call = one forward.

Providers (all answer the same question on the same inputs; ``--check`` asserts it at a tiny shape):
    ours           ``ops.nearest_code``: the native kernel (csrc/), one running (min, argmin) per row, no N×K matrix.
    cdist_argmin   ``torch.cdist(x, codebook).argmin(1)``: the (N, K) distance matrix, then its argmin.
    onehot_full    the vector-quantize-pytorch way: the full (N, K) matrix −(||x||² − 2 x·cᵀ + ||c||²), its argmax,
                   and the (N, K) one-hot of the index in x's dtype (what such a quantizer returns next to it).
    reference      ``reference.nearest_code``: plain torch, chunked over rows (≈4M scores per chunk).

Memory ("memory_extra", MB) = peak − (memory with the inputs built): every byte a provider needs beyond x and the
codebook, its output included. On CPU each (provider, K, D) runs in a fresh process started with
MALLOC_MMAP_THRESHOLD_=65536; after the warm-up calls VmHWM is reset via /proc/self/clear_refs and the first timed
call is measured (see bench/utils.py). On CUDA: torch.cuda max_memory_allocated. Points whose estimated need exceeds
--mem-fraction (0.8) of the available memory are skipped.

    python -m bench.bench_nearest_code                                 # the full CPU sweep, ~10 minutes on 2 cores
    python -m bench.bench_nearest_code --plot                          # ... and bench/plots/nearest_code.png
    python -m bench.bench_nearest_code --N 1024 --K 512,8192 --D 8 --reps 2 --out /tmp/x.csv --check
    python -m bench.bench_nearest_code --device cuda --dtype bf16 --reps 20 --out gpu.csv --plot-out gpu.png
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import utils
from hermesflow_fast.ops import nearest_code, reference

KERNEL = "nearest_code"
DEFAULT_N = 16384  # 64 images × 256 tokens
DEFAULT_K = (512, 8192, 16384)
DEFAULT_D = (8, 13, 256)
PLOT_PATH = utils.PLOTS_DIR / "nearest_code.png"

# ---------------------------------------------------------------------------------------------------------------------
# problem and inputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    N: int  # rows to quantize
    K: int  # codes
    D: int  # dims per code
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return utils.DTYPES[self.dtype]


def build_inputs(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) and codebook (K, D), randn in the problem's dtype, deterministic."""
    dev = torch.device(p.device)
    g = torch.Generator(device=dev).manual_seed(p.seed)
    x = torch.randn(p.N, p.D, generator=g, device=dev).to(p.torch_dtype)
    codebook = torch.randn(p.K, p.D, generator=g, device=dev).to(p.torch_dtype)
    return x, codebook


# ---------------------------------------------------------------------------------------------------------------------
# providers: each maps (x, codebook) to its answer (indices, or the one-hot for onehot_full)
# ---------------------------------------------------------------------------------------------------------------------

Provider = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cdist_argmin(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, codebook).argmin(1)


def _onehot_full(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.t() + codebook.pow(2).sum(1))  # (N, K)
    index = dist.argmax(1)
    return F.one_hot(index, codebook.shape[0]).to(x.dtype)  # (N, K)


PROVIDERS: dict[str, Provider] = {
    "ours": nearest_code,
    "cdist_argmin": _cdist_argmin,
    "onehot_full": _onehot_full,
    "reference": reference.nearest_code,
}
DEFAULT_PROVIDERS = tuple(PROVIDERS)


def as_index(answer: torch.Tensor) -> torch.Tensor:
    """A provider's answer as (N,) indices (onehot_full answers with the one-hot)."""
    return answer.argmax(1) if answer.dim() == 2 else answer


def estimate_bytes(name: str, p: Problem) -> int:
    """Rough peak of one measurement process: inputs + what the provider holds at its peak + torch itself."""
    elt = p.torch_dtype.itemsize
    inputs = (p.N + p.K) * p.D * elt
    matrix = p.N * p.K * 4
    held = {
        "ours": p.N * 8 + p.K * p.D * 4 + p.K * 4,
        "cdist_argmin": 2 * matrix,
        "onehot_full": 3 * matrix,
        "reference": 2 * reference.NEAREST_CODE_CHUNK_ELEMENTS * 4 + p.N * 8,
    }[name]
    return inputs + held + 400 * utils.MB


# ---------------------------------------------------------------------------------------------------------------------
# one measurement (in this process)
# ---------------------------------------------------------------------------------------------------------------------


def measure(p: Problem, provider: str, reps: int, warmup: int = 1) -> dict:
    """Build inputs, warm up, time ``reps`` calls; the first timed call also measures peak memory."""
    x, codebook = build_inputs(p)
    fn = PROVIDERS[provider]
    pm = utils.PeakMemory(p.device)
    if p.device == "cpu" and not utils.can_reset_cpu_peak():  # VmHWM cannot be reset: the first call, untimed
        with pm:
            fn(x, codebook)
        times = utils.do_bench(lambda: fn(x, codebook), warmup=max(0, warmup - 1), rep=reps, device=p.device)
    else:
        times = utils.do_bench(lambda: fn(x, codebook), warmup=warmup, rep=reps, device=p.device, first_call_ctx=pm)
    return {"provider": provider, "problem": asdict(p), "time": list(times), "mem_extra": pm.growth,
            "peak_reset": pm.reset}


def measure_in_subprocess(p: Problem, provider: str, reps: int, warmup: int, threads: int | None,
                          timeout: float | None) -> dict:
    """``measure`` in a fresh ``python -m bench.bench_nearest_code --worker`` process (CPU memory needs a fresh RSS)."""
    spec = {"problem": asdict(p), "provider": provider, "reps": reps, "warmup": warmup, "threads": threads}
    return utils.run_worker("bench.bench_nearest_code", spec, threads, timeout, f"{provider} at K={p.K} D={p.D}")


# ---------------------------------------------------------------------------------------------------------------------
# correctness gate
# ---------------------------------------------------------------------------------------------------------------------


def check_providers(providers, device: str = "cpu", dtype: str = "fp32") -> None:
    """Every provider's indices against ``reference`` at a tiny shape: equal, or a code at the same distance.

    Raises AssertionError naming the providers that pick a code farther than rounding allows.
    """
    p = Problem(N=300, K=700, D=13, dtype=dtype, device=device)
    x, codebook = build_inputs(p)
    want = reference.nearest_code(x, codebook)
    xd, cd = x.double(), codebook.double()
    best = ((xd - cd[want]) ** 2).sum(1)
    tol = 1e-3 * (xd.pow(2).sum(1) + cd.pow(2).sum(1).max())  # float32 scores (bf16/fp16 inputs widen to float32)
    bad = []
    for name in providers:
        got = as_index(PROVIDERS[name](x, codebook))
        gap = ((xd - cd[got]) ** 2).sum(1) - best
        if bool((gap.abs() > tol).any()):
            bad.append(f"{name}: {int((gap.abs() > tol).sum())} of {p.N} rows pick a farther code")
    if bad:
        raise AssertionError("providers disagree with reference at N=300 K=700 D=13:\n  " + "\n  ".join(bad))


# ---------------------------------------------------------------------------------------------------------------------
# sweep, CSV, table, plot
# ---------------------------------------------------------------------------------------------------------------------


def run_sweep(cfg: argparse.Namespace, on_result: Callable[[dict], object] | None = None) -> list[dict]:
    """Every (D, K, provider) point, smallest first; ``on_result`` sees each measurement as it lands."""
    subprocs = cfg.device == "cpu" and not cfg.inprocess
    results, dropped = [], set()
    for d in sorted(cfg.D):
        for k in sorted(cfg.K):
            p = Problem(N=cfg.N, K=k, D=d, dtype=cfg.dtype, device=cfg.device)
            for name in cfg.providers:
                if (name, d) in dropped:
                    print(f"  skip {name} at K={k} D={d}: it failed or was skipped at a smaller K", flush=True)
                    continue
                need, avail = estimate_bytes(name, p), utils.available_bytes(cfg.device)
                if need > cfg.mem_fraction * avail:
                    print(f"  skip {name} at K={k} D={d}: needs ~{need / utils.MB:,.0f} MB, "
                          f"{cfg.mem_fraction:.0%} of available is {cfg.mem_fraction * avail / utils.MB:,.0f} MB",
                          flush=True)
                    dropped.add((name, d))
                    continue
                t0 = time.perf_counter()
                try:
                    if subprocs:
                        r = measure_in_subprocess(p, name, cfg.reps, cfg.warmup, cfg.threads, cfg.worker_timeout)
                    else:
                        r = measure(p, name, cfg.reps, cfg.warmup)
                except (RuntimeError, subprocess.TimeoutExpired) as e:  # torch OOM errors are RuntimeErrors
                    print(f"  FAILED {name} at K={k} D={d}: {e}", flush=True)
                    dropped.add((name, d))
                    continue
                finally:  # in process: free this point's inputs and cached blocks before the next one
                    gc.collect()
                    if cfg.device == "cuda":
                        torch.cuda.empty_cache()
                print(f"  N={cfg.N} K={k:>6} D={d:>4}  {name:<13} {r['time'][0] * 1e3:10.2f} ms, "
                      f"extra {r['mem_extra'] / utils.MB:,.1f} MB  ({time.perf_counter() - t0:.0f} s wall)",
                      flush=True)
                results.append(r)
                if on_result is not None:
                    on_result(r)
    return results


def config_of(r: dict, cfg: argparse.Namespace) -> dict:
    p = r["problem"]
    return {
        "N": p["N"], "K": p["K"], "D": p["D"], "dtype": p["dtype"], "device": p["device"],
        "threads": torch.get_num_threads() if cfg.threads is None else cfg.threads,
        "reps": cfg.reps, "warmup": cfg.warmup, "peak_reset": r["peak_reset"], "memory": "peak - inputs",
    }


def to_rows(results: list[dict], cfg: argparse.Namespace, stamps: dict | None = None) -> list[dict]:
    stamps = stamps or utils.run_stamps(cfg.device)
    rows = []
    for r in results:
        common = dict(
            kernel_name=KERNEL, provider=r["provider"], x_name="K", x_value=r["problem"]["K"],
            config=config_of(r, cfg), device=cfg.device, dtype=cfg.dtype, stamps=stamps,
        )
        rows.append(utils.make_row(metric="time", unit="s", y=r["time"], **common))
        rows.append(utils.make_row(metric="memory_extra", unit="MB", y=[r["mem_extra"] / utils.MB] * 3, **common))
    return rows


def format_table(results: list[dict], cfg: argparse.Namespace) -> str:
    head = (
        f"{KERNEL} forward: N={cfg.N} rows, {cfg.dtype} on {utils.device_name(cfg.device)} ({cfg.device}, "
        f"{torch.get_num_threads()} threads), median of {cfg.reps} reps\n"
        "extra MB = peak − inputs (output included); ×ours = time / ours' time at the same K and D\n"
    )
    cols = f"{'D':>4} {'K':>6}  {'provider':<13} {'time ms':>10} {'[q20, q80] ms':>21} {'×ours':>8} {'extra MB':>10}"
    lines = [head, cols, "-" * len(cols)]
    order = {n: i for i, n in enumerate(PROVIDERS)}
    for d, k in sorted({(r["problem"]["D"], r["problem"]["K"]) for r in results}):
        rs = sorted((r for r in results if (r["problem"]["D"], r["problem"]["K"]) == (d, k)),
                    key=lambda r: order[r["provider"]])
        ours = next((r["time"][0] for r in rs if r["provider"] == "ours"), None)
        for r in rs:
            t = [v * 1e3 for v in r["time"]]
            ratio = f"{r['time'][0] / ours:.2f}" if ours else ""
            lines.append(f"{d:>4} {k:>6}  {r['provider']:<13} {t[0]:>10.2f} {f'[{t[1]:.2f}, {t[2]:.2f}]':>21} "
                         f"{ratio:>8} {r['mem_extra'] / utils.MB:>10.1f}")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path) -> Path:
    """One PNG: time (top) and extra memory (bottom) against K, one panel per D, one line per provider.

    ``rows`` are CSV rows of one run (the newest row per (provider, K, D) wins where there are several).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    newest: dict[tuple[str, str, int, int], dict] = {}
    for r in rows:
        cfg = json.loads(r["extra_benchmark_config_str"])
        key = (r["metric_name"], r["kernel_provider"], int(cfg["D"]), int(float(r["x_value"])))
        if key not in newest or r["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = r
    dims = sorted({key[2] for key in newest})
    providers = [p for p in PROVIDERS if any(key[1] == p for key in newest)]
    fig, axes = plt.subplots(2, len(dims), figsize=(4.2 * len(dims), 7), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for col, d in enumerate(dims):
        for row, (metric, label, scale) in enumerate((("time", "time (ms)", 1e3), ("memory_extra", "extra MB", 1.0))):
            ax = axes[row][col]
            for i, provider in enumerate(providers):
                pts = sorted((k, newest[(metric, provider, d, k)]) for (m, pr, dd, k) in newest
                             if (m, pr, dd) == (metric, provider, d))
                if not pts:
                    continue
                ks = [k for k, _ in pts]
                y50 = [float(r["y_value_50"]) * scale for _, r in pts]
                y20 = [float(r["y_value_20"]) * scale for _, r in pts]
                y80 = [float(r["y_value_80"]) * scale for _, r in pts]
                ax.plot(ks, y50, marker="osD^"[i % 4], color=colors[i], label=provider)
                ax.fill_between(ks, y20, y80, alpha=0.2, color=colors[i])
            ax.set_xscale("log", base=2)
            values = [float(r["y_value_50"]) for (m, _, dd, _), r in newest.items() if (m, dd) == (metric, d)]
            if all(v > 0 for v in values):
                ax.set_yscale("log")
            else:  # a memory growth of 0 (or RSS noise below it): linear near 0, log above
                ax.set_yscale("symlog", linthresh=0.1)
                ax.set_ylim(bottom=min(0.0, *values))
            ax.set_xlabel("K (codes)")
            ax.set_ylabel(label)
            ax.set_title(f"D = {d}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    first = next(iter(newest.values()))
    n = json.loads(first["extra_benchmark_config_str"])["N"]
    fig.suptitle(f"{KERNEL} forward, N={n} rows, {first['dtype']} · {first['device_name']} · {first['commit']} · "
                 f"torch {first['torch_version']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_nearest_code", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--N", type=int, default=DEFAULT_N, help=f"rows to quantize (default {DEFAULT_N})")
    ap.add_argument("--K", type=_ints, default=list(DEFAULT_K),
                    help=f"codebook sizes, comma separated (default {','.join(map(str, DEFAULT_K))})")
    ap.add_argument("--D", type=_ints, default=list(DEFAULT_D),
                    help=f"code dims, comma separated (default {','.join(map(str, DEFAULT_D))})")
    ap.add_argument("--providers", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                    help=f"comma separated, from {','.join(PROVIDERS)} (default all)")
    ap.add_argument("--dtype", choices=tuple(utils.DTYPES), default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per point (default 3 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1 on CPU, 3 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=str(utils.RESULTS_DIR / "nearest_code.csv"), help="CSV to append to ('' for none)")
    ap.add_argument("--check", action="store_true",
                    help="first assert every provider picks the reference's code (or one as near) at a tiny shape")
    ap.add_argument("--inprocess", action="store_true",
                    help="measure in this process (CPU memory numbers are then approximate)")
    ap.add_argument("--plot", action="store_true", help=f"write a PNG of this run's rows (default {PLOT_PATH})")
    ap.add_argument("--plot-out", default=None, help="where --plot writes (implies --plot)")
    ap.add_argument("--mem-fraction", type=float, default=0.8,
                    help="skip a point whose estimated need exceeds this fraction of available memory")
    ap.add_argument("--worker-timeout", type=float, default=None, help="seconds per CPU measurement process")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    if cfg.worker is not None:
        return cfg
    if cfg.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    cfg.reps = cfg.reps or (20 if cfg.device == "cuda" else 3)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (3 if cfg.device == "cuda" else 1)
    cfg.providers = cfg.providers or list(DEFAULT_PROVIDERS)
    unknown = [n for n in cfg.providers if n not in PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; choose from {','.join(PROVIDERS)}")
    if cfg.N < 1 or min(cfg.K) < 1 or min(cfg.D) < 1:
        ap.error("--N, --K and --D must be positive")
    cfg.plot = cfg.plot or cfg.plot_out is not None
    cfg.plot_out = cfg.plot_out or str(PLOT_PATH)
    return cfg


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep the arguments describe; returns the measurements (dicts) and appends them to ``--out``."""
    cfg = parse_args(argv)
    if cfg.worker is not None:
        utils.worker_main(cfg.worker, measure, Problem)
        return []
    cfg.threads = cfg.threads or None
    utils.set_threads(cfg.threads)
    if cfg.check:
        check_providers(cfg.providers, cfg.device, cfg.dtype)
        print(f"check: {', '.join(cfg.providers)} pick the reference's codes at N=300 K=700 D=13", flush=True)
    where = "one fresh process per point" if cfg.device == "cpu" and not cfg.inprocess else "in process"
    print(f"sweep: N={cfg.N}, K {cfg.K}, D {cfg.D}, providers {cfg.providers}, {where}", flush=True)
    stamps, results, rows = utils.run_stamps(cfg.device), [], []

    def keep(r: dict) -> None:  # row by row, so an interrupted sweep keeps what it measured
        results.append(r)
        new = to_rows([r], cfg, stamps)
        rows.extend(new)
        if cfg.out:
            utils.append_rows(cfg.out, new)

    try:
        run_sweep(cfg, keep)
    except KeyboardInterrupt:
        print("\ninterrupted: the table below has the points measured so far")
    print()
    print(format_table(results, cfg))
    if cfg.out:
        print(f"appended {len(rows)} rows to {cfg.out}")
    if cfg.plot and rows:
        print(f"wrote {plot(rows, cfg.plot_out)}")
    return results


if __name__ == "__main__":
    main()
