"""Launch configuration, the owned backward's plan and the memory model of the fused head's Triton kernels
(kernels/linear_logprobs.py): pure Python, no tensor, no GPU, no Triton needed, so plans and peak-memory bounds can
be checked on any machine.

Why these and not the alternatives, at the H100 shape N = 16,384, H = 2048, V = 58,498, bf16 (G = 3.93 TFLOP;
inputs + gradients 613.7 MB, so the ≤ 0.2× target is 122.7 MB of extra memory):
  * a program that owns a (vocab tile, H block) of dW and recomputes its logits tile per H block: ×H/BLOCK_H
    logits GEMMs (16 at 128-wide blocks): ~16 G of recomputation alone, against 3–4 G for the whole backward.
  * a program that owns a row block of dx over the whole vocabulary: its (BLOCK_M, H) fp32 accumulator is 1 MB at
    BLOCK_M = 128, H = 2048, far beyond registers or shared memory, so it too would recompute per H block.
  * dx by atomics (as "atomic") or summed over vocab chunks, in one fp32 (N, H) buffer: 134.2 MB = 0.219× on its
    own, over budget before any scratch. Up to ~9.6k tokens at this head it fits, and the one-pass plan uses it.
  * what the plans give (`plan_owned_backward`, `backward_extra_bytes`, `backward_gemm_flops`; FLOPs count the
    forward too, as multiples of the 3 G floor of forward + dx + dW, and of the 4 G floor of the benchmark's DPO
    step, which adds the reference's forward):

        tokens  plan                             extra MB  ÷ inputs+grads   op FLOPs ÷ 3G   DPO step ÷ 4G
        16,384  two-pass, Vc 3200, Nr 896          106.6        0.174           1.67            1.50
         8,192  one-pass, Vc 1792                   97.0        0.177           1.33            1.25
         2,048  one-pass, Vc 14,720                 78.1        0.157           1.33            1.25
        atomic, any N (16,384)                     613.7        1.000           1.33            1.25

    The dz scratch adds traffic: N·V·e bytes written and read back once per pass (1.9 GB each way at 16,384 bf16
    tokens, ~2.3 ms at 3.35 TB/s over both passes, beside ~24 ms of GEMMs at 660 TFLOP/s).

Launch tuning (`_launch_config`), unmeasured starting points until a GPU sweep replaces them:
  * 16-bit inputs: BLOCK_M = BLOCK_N = 128, BLOCK_K = 64, 8 warps (the usual Hopper/Ampere bf16 GEMM tile;
    bigger tiles also cut the backward atomics above). BLOCK_M shrinks to the next power of two ≥ N (min 16,
    `tl.dot`'s smallest shape) so tiny N does not waste the tensor cores.
  * fp32 inputs use `input_precision="ieee"` (exact fp32 products, CUDA-core speed), 64×64×32 tiles, 4 warps:
    fp32 is the accuracy path for tests, not the training path. TF32 is not used anywhere.
  * vocab splits: enough (row block, split) programs for ~2 waves of SMs when N is small (a decode-sized N=64
    gives 1 row block, so V=58,498 is split 115 ways on an H100 instead of running on one SM), but at least 4 vocab
    tiles per split so the online-softmax state is amortized. Large N gets splits = 1.
  * owned GEMM tiles: dW tiles (BLOCK_N, BLOCK_H) summed over tokens in BLOCK_K steps, dx tiles (BLOCK_M,
    BLOCK_H) summed over the vocabulary in BLOCK_K steps; BLOCK_H = 128 (16-bit), 64 (fp32). At 16,384 tokens the
    row pass's 896-row chunks give only 7 × 16 dx tiles per launch (< 132 SMs): the first thing a GPU sweep
    should look at (smaller BLOCK_H, or a larger row chunk).
  * No `triton.autotune`: N changes every step in a trainer and would retune on each new value, and the backward
    atomics would need reset_to_zero between trials. Under the interpreter tiles are 16/32/16 (BLOCK_H 32) to
    keep it fast, bf16 MMA operands are widened to fp32 and bf16 stores rounded by hand (`_mma`, `_cast`: the
    interpreter's bf16 `tl.dot` multiplies raw bits and its fp32 -> bf16 cast truncates).

    .venv/bin/python -m pytest -q -m "not interpret" tests/kernels/test_linear_logprobs_owned.py
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["BUDGET_FRACTION", "DW_MODES", "ONE_PASS_MIN_COLS", "SCRATCH_ALIGN", "LaunchConfig", "OwnedPlan",
           "backward_extra_bytes", "backward_gemm_flops", "inputs_and_grads_bytes", "plan_owned_backward",
           "resolve_dw_mode"]

# ---------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------------

MIN_TILES_PER_SPLIT = 4  # vocab tiles a forward split must own before another split is worth a program
WAVES = 2  # forward programs aimed at per SM when N alone cannot fill the GPU


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch knobs of one call; ``splits=None`` lets the forward choose its vocab split.

    block_m / block_n / block_k: rows, vocab columns and H step of a logits tile (forward, atomic backward, and the
    owned dz kernel). block_h: the H width of an owned-mode GEMM output tile (dW's (block_n, block_h) tiles, summed
    over tokens in block_k steps; dx's (block_m, block_h) tiles, summed over the vocab in block_k steps)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    splits: int | None = None
    block_h: int = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a pretend GPU, small enough that the split path is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_config(n: int, dtype: torch.dtype) -> LaunchConfig:
    """Tile sizes for N rows of ``dtype`` (see the module docstring for why these numbers). Pure Python."""
    if _interpreting():
        return LaunchConfig(16, 32, 16, block_h=32)
    fit_m = max(16, _next_pow2(max(n, 1)))
    if dtype == torch.float32:
        return LaunchConfig(min(64, fit_m), 64, 32, num_warps=4, num_stages=2, block_h=64)
    block_m = min(128, fit_m)
    return LaunchConfig(block_m, 128, 64, num_warps=8 if block_m == 128 else 4, num_stages=3, block_h=128)


# ---------------------------------------------------------------------------------------------------------------------
# Backward modes, the owned mode's plan, and the memory model (pure Python: no tensor, no GPU, no Triton needed)
# ---------------------------------------------------------------------------------------------------------------------

DW_MODES = ("auto", "owned", "atomic")
BUDGET_FRACTION = 0.18  # owned-mode scratch budget, a fraction of inputs + gradients (the target is ≤ 0.2)
ONE_PASS_MIN_COLS = 1024  # one-pass plan only if its vocab chunks are at least this wide (see the module docstring)
SCRATCH_ALIGN = 64  # dz scratch rows are padded to a multiple of this many elements (aligned, vectorizable loads)


def resolve_dw_mode(dw_mode: str, dtype: torch.dtype) -> str:
    """'auto' -> 'owned' for fp16/bf16 inputs, 'atomic' otherwise. Unknown names raise ValueError."""
    if dw_mode not in DW_MODES:
        raise ValueError(f"dw_mode={dw_mode!r} is not one of {DW_MODES}")
    if dw_mode == "auto":
        return "owned" if dtype in (torch.float16, torch.bfloat16) else "atomic"
    return dw_mode


@dataclass(frozen=True)
class OwnedPlan:
    """How the owned backward cuts its work (see the module docstring).

    vocab_chunk: columns Vc of one step of the vocabulary pass (dz scratch (N, Vc); dW and db of those columns).
    row_chunk: rows Nr of one step of the row pass (dz scratch (Nr, V); dx of those rows); 0 when there is none.
    dx_in_vocab_pass: dx is summed over the vocab chunks in an fp32 (N, H) buffer (one pass, no row pass).
    """

    vocab_chunk: int
    row_chunk: int
    dx_in_vocab_pass: bool


def inputs_and_grads_bytes(n: int, h: int, v: int, dtype: torch.dtype, bias: bool = True) -> int:
    """Bytes of x (N, H), W (V, H), b (V,) and of their gradients dx, dW, db, all in ``dtype``."""
    return 2 * dtype.itemsize * (n * h + v * h + (v if bias else 0))


def _fixed_bytes(n: int) -> int:
    """The backward's per-row temporaries: the fp32 effective grad (N,) and the ignore mask (N,) it is built from,
    and a few scalars (x's max-norm and its finiteness flag)."""
    return 5 * n + 64


def _padded(width: int) -> int:
    return _cdiv(width, SCRATCH_ALIGN) * SCRATCH_ALIGN


def _balanced(total: int, cap: int, quantum: int) -> int:
    """The chunk length for cutting ``total`` into the fewest chunks of at most ``cap`` (rounded down to a multiple
    of ``quantum``, at least ``quantum``), evened out and rounded up to a multiple of ``quantum``."""
    cap = max(quantum, cap // quantum * quantum)
    if cap >= total:
        return total
    return _cdiv(_cdiv(total, _cdiv(total, cap)), quantum) * quantum


def _needs(needs, bias: bool) -> tuple[bool, bool, bool]:
    need_dx, need_dw, need_db = (bool(t) for t in needs)
    return need_dx, need_dw, need_db and bias


def plan_owned_backward(
    n: int, h: int, v: int, dtype: torch.dtype, *, bias: bool = True, needs=(True, True, True),
    budget_bytes: int | None = None, cfg: LaunchConfig | None = None,
) -> OwnedPlan:
    """The owned backward's chunking for N rows, hidden H, vocab V: its scratch fits ``budget_bytes`` (default
    BUDGET_FRACTION × :func:`inputs_and_grads_bytes`) unless even one tile-wide chunk does not.

    One pass (3 GEMMs) when dx's fp32 (N, H) accumulator fits beside vocab chunks of ≥ ONE_PASS_MIN_COLS columns,
    else two passes (4 GEMMs: the row pass recomputes the logits for dx). Chunks are evened out and rounded to
    whole tiles (block_n columns, block_m rows)."""
    cfg = cfg or _launch_config(n, dtype)
    need_dx, need_dw, need_db = _needs(needs, bias)
    if budget_bytes is None:
        budget_bytes = int(BUDGET_FRACTION * inputs_and_grads_bytes(n, h, v, dtype, bias))
    e = dtype.itemsize
    avail = max(0, budget_bytes - _fixed_bytes(n))
    per_col = max(1, n * e + (4 * (_cdiv(n, cfg.block_m) + 1) if need_db else 0))  # scratch + db partials per column
    pad = n * e * (SCRATCH_ALIGN - 1)  # at most this much padding on the scratch's rows
    vocab_chunk = row_chunk = 0
    one_pass = False
    if need_dw or need_db:
        left = avail - 4 * n * h - pad
        if need_dx and left >= per_col * min(v, ONE_PASS_MIN_COLS):
            one_pass = True
            vocab_chunk = _balanced(v, left // per_col, cfg.block_n)
        else:
            vocab_chunk = _balanced(v, (avail - pad) // per_col, cfg.block_n)
    if need_dx and not one_pass:
        row_chunk = _balanced(max(n, 1), avail // (_padded(v) * e), cfg.block_m)
    return OwnedPlan(vocab_chunk, row_chunk, one_pass)


def backward_extra_bytes(
    n: int, h: int, v: int, dtype: torch.dtype, *, bias: bool = True, needs=(True, True, True),
    dw_mode: str = "auto", plan: OwnedPlan | None = None, cfg: LaunchConfig | None = None,
) -> int:
    """Peak bytes the backward allocates beyond its inputs and its returned gradients (dx, dW, db in the inputs'
    dtype), for N rows, hidden H, vocab V of ``dtype``: the model the launchers follow allocation by allocation.

    atomic: fp32 dx, dW, db buffers (for fp32 inputs they are the gradients themselves, so nothing extra).
    owned: the larger of the vocab pass (dz scratch (N, Vc), db partials, the one-pass plan's fp32 dx) and the row
    pass (dz scratch (Nr, V)), plus the per-row temporaries."""
    if n == 0:
        return 0
    need_dx, need_dw, need_db = _needs(needs, bias)
    fixed = _fixed_bytes(n)
    if resolve_dw_mode(dw_mode, dtype) == "atomic":
        if dtype == torch.float32:
            return fixed
        return fixed + 4 * (need_dx * n * h + need_dw * v * h + need_db * v)
    cfg = cfg or _launch_config(n, dtype)
    plan = plan or plan_owned_backward(n, h, v, dtype, bias=bias, needs=needs, cfg=cfg)
    e = dtype.itemsize
    vocab = row = 0
    if need_dw or need_db or (need_dx and plan.dx_in_vocab_pass):
        vc = min(plan.vocab_chunk, v)
        vocab = n * _padded(vc) * e + (4 * (_cdiv(n, cfg.block_m) + 1) * vc if need_db else 0)
        vocab += 4 * n * h if need_dx and plan.dx_in_vocab_pass else 0
    if need_dx and not plan.dx_in_vocab_pass:
        row = min(plan.row_chunk, n) * _padded(v) * e
    return fixed + max(vocab, row)


def backward_gemm_flops(n: int, h: int, v: int, *, dw_mode: str = "owned", plan: OwnedPlan | None = None,
                        needs=(True, True, True)) -> int:
    """Matmul FLOPs of the backward (multiples of one N×H×V GEMM, 2·N·H·V): atomic 3, owned one-pass 3, owned
    two-pass 4 (the row pass recomputes the logits), fewer when a gradient is not needed."""
    need_dx, need_dw, need_db = (bool(t) for t in needs)
    gemm = 2 * n * h * v
    if dw_mode == "atomic":
        return gemm * (1 + need_dx + need_dw)
    plan = plan or OwnedPlan(v, 0, True)
    vocab_pass = need_dw or need_db or (need_dx and plan.dx_in_vocab_pass)
    total = vocab_pass * (1 + need_dw + (need_dx and plan.dx_in_vocab_pass))
    if need_dx and not plan.dx_in_vocab_pass:
        total += 2
    return gemm * total
