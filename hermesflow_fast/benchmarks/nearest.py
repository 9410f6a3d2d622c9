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
call is measured (see measure.py). On CUDA: torch.cuda max_memory_allocated. Points whose estimated need exceeds
--mem-fraction (0.8) of the available memory are skipped.

    hermesflow bench nearest                                 # the full CPU sweep, ~10 minutes on 2 cores
    hermesflow bench nearest --plot                          # ... and bench/plots/nearest_code.png
    hermesflow bench nearest --N 1024 --K 512,8192 --D 8 --reps 2 --out /tmp/x.csv --check
    python -m hermesflow_fast.benchmarks.nearest --device cuda --dtype bf16 --reps 20 --out gpu.csv --plot-out gpu.png

Results: --out FILE, or <--results DIR>/nearest_code.csv; by default bench/results/nearest_code.csv when the current
folder is a checkout (it has bench/results), else ./bench-results/nearest_code.csv (the plot beside it).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hermesflow_fast.benchmarks.harness import DTYPES, MB, Axis, Ratio, Sweep, time_and_memory
from hermesflow_fast.ops import nearest_code, reference

KERNEL = "nearest_code"


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
        return DTYPES[self.dtype]


def build_inputs(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) and codebook (K, D), randn in the problem's dtype, deterministic."""
    dev = torch.device(p.device)
    g = torch.Generator(device=dev).manual_seed(p.seed)
    x = torch.randn(p.N, p.D, generator=g, device=dev).to(p.torch_dtype)
    codebook = torch.randn(p.K, p.D, generator=g, device=dev).to(p.torch_dtype)
    return x, codebook


# providers: each maps (x, codebook) to its answer (indices, or the one-hot for onehot_full)
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
    inputs = (p.N + p.K) * p.D * p.torch_dtype.itemsize
    matrix = p.N * p.K * 4
    held = {
        "ours": p.N * 8 + p.K * p.D * 4 + p.K * 4,
        "cdist_argmin": 2 * matrix,
        "onehot_full": 3 * matrix,
        "reference": 2 * reference.NEAREST_CODE_CHUNK_ELEMENTS * 4 + p.N * 8,
    }[name]
    return inputs + held + 400 * MB


def measure(p: Problem, provider: str, reps: int, warmup: int = 1) -> dict:
    """Build inputs, warm up, time ``reps`` calls; one call also measures peak memory."""
    x, codebook = build_inputs(p)
    fn = PROVIDERS[provider]
    times, pm = time_and_memory(lambda: fn(x, codebook), p.device, reps, warmup)
    return {"time": list(times), "mem_extra": pm.growth, "peak_reset": pm.reset}


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


def _check(cfg: argparse.Namespace) -> str:
    check_providers(cfg.providers, cfg.device, cfg.dtype)
    return f"check: {', '.join(cfg.providers)} pick the reference's codes at N=300 K=700 D=13"


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--N", type=int, default=16384, help="rows to quantize (default 16384: 64 images × 256 tokens)")


SWEEP = Sweep(
    name="nearest_code", module="hermesflow_fast.benchmarks.nearest", doc=__doc__, kernel=KERNEL,
    axes=[Axis("D", (8, 13, 256), "code dims"), Axis("K", (512, 8192, 16384), "codebook sizes")],
    providers=tuple(PROVIDERS), problem_type=Problem, measure=measure, estimate_bytes=estimate_bytes,
    problem=lambda pt, cfg: Problem(N=cfg.N, K=pt["K"], D=pt["D"], dtype=cfg.dtype, device=cfg.device),
    check=_check, fresh_process=True, reps=(3, 20), warmup=(1, 3), time_unit="ms", options=_options,
    validate=lambda cfg: "--N, --K and --D must be positive" if min(cfg.N, *cfg.K, *cfg.D) < 1 else None,
    ratios=[Ratio("×ours", "ours")], panel="D",
    config=lambda r, cfg: {"N": cfg.N, "memory": "peak - inputs"},
    title=lambda cfg: (f"{KERNEL} forward: N={cfg.N} rows\n"
                       "extra MB = peak − inputs (output included); ×ours = time / ours' time at the same K and D"),
)
main = SWEEP.main

if __name__ == "__main__":
    main()
