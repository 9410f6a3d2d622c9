"""Fused linear head + log-softmax + target gather, as Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1).

Math (per row t; x (N, H) hidden, W (V, H) LM head, b (V,) optional bias, y (N,) int64 targets):

    z_t      = x_t Wᵀ + b                                   (V,)  never written to HBM, only (BLOCK_M, BLOCK_N) tiles
    lse_t    = logsumexp_v z_t,v
    logp_t   = z_t,y_t − lse_t,        0 where y_t == ignore_index
    backward, with upstream g (N,):
    dz_t     = g_t · (onehot(y_t) − softmax(z_t)),   0 on ignored rows
    dx = dz W (N, H),   dW = dzᵀ x (V, H),   db = Σ_t dz_t (V,)

Everything is accumulated in fp32 whatever the input dtype: logp and lse come out fp32, dx / dW / db are summed in
fp32 buffers and cast to x / W / b's dtype once at the end (bf16 running sums of dW degrade training: Liger #512,
#830, #1391). The design is Apple's Cut Cross-Entropy (arXiv 2411.09009) without its gradient filtering, whose
approximation is not safe for DPO's difference of two nearly equal log-likelihoods (perf-anchors §2.2, §2.5):

    forward   `_fwd_kernel`, grid (cdiv(N, BLOCK_M), splits). A program owns a row block and a contiguous run of
              vocab tiles. Per tile: a K-loop of `tl.dot` over H builds the fp32 logits tile, the bias is added,
              columns ≥ V are set to −inf, and an online (max, sum-exp) per row is updated — flash-attention's
              rescaling trick — while the target logit is picked when y_t falls in the tile. Each split writes its
              partial lse and target logit; `_combine_kernel` merges the splits (N·splits floats) and zeroes the
              ignored rows. 1 GEMM of N·H·V; only lse (N floats) is kept for backward.
    backward  `_bwd_kernel`, 1-D grid over (row block, vocab tile) pairs, GROUP_M-swizzled so that concurrent
              programs share W and x tiles in L2. A program recomputes its logits tile (K-loop as above), forms
              dz = g·(onehot − exp(z − lse)) in registers, then walks H again in BLOCK_K chunks and adds
              dz @ W[tile] into dx[rows] and dzᵀ @ x[rows] into dW[tile] with relaxed fp32 `tl.atomic_add`; db gets
              a column sum of dz the same way. 3 GEMMs of N·H·V, +33% head FLOPs over grad-in-forward (§2.5),
              in exchange for any per-row upstream g (a pair's DPO coefficient is only known after its loss).
              Rows that are ignored or have g = 0 are dead: they add exactly nothing (no atomics to their dx
              rows, their x never loaded for dW), and a row block with no live row returns before any load.

Why atomics rather than separate dx and dW kernels: the contraction dimension of dx (V) and of dW (N) is the one
the program tiles over, so a kernel that owns a dx block would either hold a (BLOCK_M, H) accumulator across all
vocab tiles (2048 fp32 columns: far beyond registers) or recompute the logits tile once per H block (×H/BLOCK_K
the forward GEMM). The price of atomics is traffic: N·H·V·(1/BLOCK_N + 1/BLOCK_M) fp32 reductions into L2 [est:
for N=8192, H=2048, V=58,498 and 128×128 tiles, ~15 G adds ≈ 61 GB of L2 atomics beside ~5.9 TFLOP of GEMMs],
so backward is likely atomic-bound on H100 until tiles grow; dx atomics are masked off for dead rows. Atomics
also make dx / dW run-to-run nondeterministic in the last fp32 bits.

Launch tuning (`_launch_config`), unmeasured starting points until a GPU sweep replaces them:
  * 16-bit inputs: BLOCK_M = BLOCK_N = 128, BLOCK_K = 64, 8 warps (the usual Hopper/Ampere bf16 GEMM tile;
    bigger tiles also cut the backward atomics above). BLOCK_M shrinks to the next power of two ≥ N (min 16,
    `tl.dot`'s smallest shape) so tiny N does not waste the tensor cores.
  * fp32 inputs use `input_precision="ieee"` (exact fp32 products, CUDA-core speed), 64×64×32 tiles, 4 warps:
    fp32 is the accuracy path for tests, not the training path. TF32 is not used anywhere.
  * vocab splits: enough (row block, split) programs for ~2 waves of SMs when N is small (a decode-sized N=64
    gives 1 row block, so V=58,498 is split 115 ways on an H100 instead of running on one SM), but at least 4 vocab
    tiles per split so the online-softmax state is amortized. Large N gets splits = 1.
  * No `triton.autotune`: N changes every step in a trainer and would retune on each new value, and the backward
    atomics would need reset_to_zero between trials. Under the interpreter tiles are 16/32/16 to keep it fast.

Tests:   TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -m interpret tests/kernels/test_linear_logprobs.py
         .venv/bin/python -m pytest -q -m gpu tests/kernels/test_linear_logprobs.py       (CUDA, bf16 vs fp64)
Bench:   make bench   (hermesflow bench logprobs; reference in hermesflow_fast/ops/reference.py)
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the module still imports; the ops layer falls back to the reference
    triton = tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "LaunchConfig",
    "LinearLogprobsFunction",
    "linear_logprobs_backward",
    "linear_logprobs_forward",
]

# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _logits_tile(
        x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """fp32 (BLOCK_M, BLOCK_N) tile of x[rows] · W[cols]ᵀ + b[cols]; −inf in columns ≥ V."""
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # (BM, 1), int64: N·H may pass 2^31
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w  # (1, BN)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, H, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            xt = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            wt = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BK, BN)
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return tl.where(col_ok[None, :], acc, float("-inf"))

    @triton.jit
    def _fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, lse_part_ptr, tgt_part_ptr,
        N, H, V, stride_x, stride_w, tiles_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Partial (lse, target logit) of one row block over one split of the vocab -> part[split, rows]."""
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)  # (BM,) int64

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max
        s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running Σ exp(z − m_i)
        t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # target logit, 0 unless y falls in this split
        first = split * tiles_per_split
        last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_N))
        for tile in range(first, last):
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            z = _logits_tile(
                x_ptr, w_ptr, b_ptr, rows, cols, row_ok, cols < V, H, stride_x, stride_w,
                HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
            )  # (BM, BN)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new
            t_i += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

        out = split * N + rows
        tl.store(lse_part_ptr + out, m_i + tl.log(s_i), mask=row_ok)
        tl.store(tgt_part_ptr + out, t_i, mask=row_ok)

    @triton.jit
    def _combine_kernel(
        lse_part_ptr, tgt_part_ptr, y_ptr, logp_ptr, lse_ptr, N, splits, ignore_index, BLOCK: tl.constexpr,
    ):
        """lse = logsumexp over splits, logp = Σ target partials − lse (0 on ignored rows)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK,), dtype=tl.float32)
        t = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(0, splits):
            part = tl.load(lse_part_ptr + split * N + rows, mask=ok, other=0.0)
            m_new = tl.maximum(m, part)
            s = s * tl.exp(m - m_new) + tl.exp(part - m_new)
            m = m_new
            t += tl.load(tgt_part_ptr + split * N + rows, mask=ok, other=0.0)
        lse = m + tl.log(s)
        y = tl.load(y_ptr + rows, mask=ok, other=ignore_index)
        tl.store(lse_ptr + rows, lse, mask=ok)
        tl.store(logp_ptr + rows, tl.where(y != ignore_index, t - lse, 0.0), mask=ok)

    @triton.jit
    def _bwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr,
        N, H, V, stride_x, stride_w, ignore_index,
        HAS_BIAS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Recompute one (row block, vocab tile) of logits; atomically add its share of dx, dW and db (fp32)."""
        # GROUP_M row blocks sweep the vocab together: their W tiles and x rows stay hot in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(N, BLOCK_M)
        per_group = GROUP_M * tl.cdiv(V, BLOCK_N)
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        col_ok = cols < V
        y = tl.load(y_ptr + rows, mask=row_ok, other=0)  # (BM,) int64
        g = tl.load(g_ptr + rows, mask=row_ok & (y != ignore_index), other=0.0)  # (BM,) fp32
        # A row is live when it is kept and has upstream grad (NaN != 0: a NaN grad still propagates). Dead rows add
        # exactly nothing, even if their logits are NaN, so a row never depends on which neighbours share its block.
        live = g != 0.0
        if tl.sum(live.to(tl.int32), axis=0) > 0:
            z = _logits_tile(
                x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
                HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
            )  # (BM, BN)
            lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
            p = tl.exp(z - lse[:, None])  # softmax; 0 in columns ≥ V
            dz = tl.where(cols[None, :] == y[:, None], 1.0 - p, -p) * g[:, None]
            dz = tl.where(live[:, None], dz, 0.0)  # where, not ·0: a dead row's logits may be NaN
            if COMPUTE_DB:
                tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
            # MMA operands in the input dtype (as flash-attn's dS), fp32 accumulation and fp32 atomics.
            dz_op = dz.to(x_ptr.dtype.element_ty)
            dx_rows = dx_ptr + rows.to(tl.int64)[:, None] * H  # (BM, 1)
            dw_cols = dw_ptr + cols.to(tl.int64)[:, None] * H  # (BN, 1)
            x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # (BM, 1)
            w_cols = w_ptr + cols.to(tl.int64)[:, None] * stride_w  # (BN, 1)
            for k in range(0, H, BLOCK_K):
                ks = (k + tl.arange(0, BLOCK_K))[None, :]  # (1, BK)
                k_ok = ks < H
                if COMPUTE_DX:
                    wt = tl.load(w_cols + ks, mask=col_ok[:, None] & k_ok, other=0.0)  # (BN, BK)
                    dxt = tl.dot(dz_op, wt, input_precision=DOT_PRECISION)  # (BM, BK)
                    tl.atomic_add(dx_rows + ks, dxt, mask=live[:, None] & k_ok, sem="relaxed")
                if COMPUTE_DW:
                    # Dead rows are not even loaded: their dz is 0, and 0·NaN would poison dW.
                    xt = tl.load(x_rows + ks, mask=live[:, None] & k_ok, other=0.0)  # (BM, BK)
                    dwt = tl.dot(tl.trans(dz_op), xt, input_precision=DOT_PRECISION)  # (BN, BK)
                    tl.atomic_add(dw_cols + ks, dwt, mask=col_ok[:, None] & k_ok, sem="relaxed")


# ---------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------------

MIN_TILES_PER_SPLIT = 4  # vocab tiles a forward split must own before another split is worth a program
WAVES = 2  # forward programs aimed at per SM when N alone cannot fill the GPU


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch knobs of one call; ``splits=None`` lets the forward choose its vocab split."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    splits: int | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a pretend GPU, small enough that the split path is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_config(n: int, dtype: torch.dtype) -> LaunchConfig:
    """Tile sizes for N rows of ``dtype`` (see the module docstring for why these numbers)."""
    if _interpreting():
        return LaunchConfig(16, 32, 16)
    fit_m = max(16, triton.next_power_of_2(max(n, 1)))
    if dtype == torch.float32:
        return LaunchConfig(min(64, fit_m), 64, 32, num_warps=4, num_stages=2)
    block_m = min(128, fit_m)
    return LaunchConfig(block_m, 128, 64, num_warps=8 if block_m == 128 else 4, num_stages=3)


def _forward_splits(n: int, v: int, cfg: LaunchConfig, device: torch.device) -> tuple[int, int]:
    """(splits, tiles_per_split) with no empty split."""
    row_blocks = triton.cdiv(n, cfg.block_m)
    tiles = triton.cdiv(v, cfg.block_n)
    splits = cfg.splits
    if splits is None:
        splits = min(triton.cdiv(WAVES * _num_sms(device), row_blocks), triton.cdiv(tiles, MIN_TILES_PER_SPLIT))
    per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    return triton.cdiv(tiles, per_split), per_split


def _dot_precision(dtype: torch.dtype) -> str:
    # "ieee": exact fp32 products for fp32 inputs. For 16-bit inputs the option is ignored by tl.dot.
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _check(x, weight, targets, bias) -> None:
    assert HAS_TRITON, "triton is not installed; use hermesflow_fast.ops.reference.linear_logprobs"
    assert x.is_cuda or _interpreting(), "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    assert x.stride(1) == 1 and weight.stride(1) == 1, "x and weight need a contiguous last dim"
    assert targets.shape == (x.shape[0],) and targets.dtype == torch.int64, (targets.shape, targets.dtype)
    assert x.device == weight.device == targets.device, (x.device, weight.device, targets.device)
    if bias is not None:
        assert bias.shape == (weight.shape[0],) and bias.device == x.device, (bias.shape, bias.device)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def _forward(x, weight, targets, bias, ignore_index, cfg: LaunchConfig):
    n, h = x.shape
    v = weight.shape[0]
    logp = torch.empty(n, device=x.device, dtype=torch.float32)
    lse = torch.empty(n, device=x.device, dtype=torch.float32)
    if n == 0:
        return logp, lse
    splits, per_split = _forward_splits(n, v, cfg, x.device)
    lse_part = torch.empty((splits, n), device=x.device, dtype=torch.float32)  # (S, N)
    tgt_part = torch.empty((splits, n), device=x.device, dtype=torch.float32)  # (S, N)
    b = bias if bias is not None else x  # never read when HAS_BIAS is False
    with _device_guard(x):
        _fwd_kernel[(triton.cdiv(n, cfg.block_m), splits)](
            x, weight, b, targets, lse_part, tgt_part,
            n, h, v, x.stride(0), weight.stride(0), per_split,
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        block = 64 if _interpreting() else 1024
        _combine_kernel[(triton.cdiv(n, block),)](
            lse_part, tgt_part, targets, logp, lse, n, splits, ignore_index, BLOCK=block
        )
    return logp, lse


def _backward(x, weight, targets, lse, grad_logp, bias, ignore_index, needs_input_grad, cfg: LaunchConfig):
    need_dx, need_dw, need_db = needs_input_grad
    need_db = bool(need_db) and bias is not None
    n, h = x.shape
    v = weight.shape[0]
    dx = torch.zeros((n, h), device=x.device, dtype=torch.float32) if need_dx else None
    dw = torch.zeros((v, h), device=x.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros((v,), device=x.device, dtype=torch.float32) if need_db else None
    if n > 0 and (need_dx or need_dw or need_db):
        g = grad_logp.to(torch.float32).contiguous()  # autograd may hand in an expanded (stride 0) grad
        lse = lse.to(torch.float32).contiguous()
        b = bias if bias is not None else x
        grid = (triton.cdiv(n, cfg.block_m) * triton.cdiv(v, cfg.block_n),)
        with _device_guard(x):
            _bwd_kernel[grid](
                x, weight, b, targets, lse, g,
                dx if need_dx else g, dw if need_dw else g, db if need_db else g,  # placeholders are never touched
                n, h, v, x.stride(0), weight.stride(0), ignore_index,
                HAS_BIAS=bias is not None, COMPUTE_DX=bool(need_dx), COMPUTE_DW=bool(need_dw), COMPUTE_DB=need_db,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    return (
        dx.to(x.dtype) if dx is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def linear_logprobs_forward(x, weight, targets, bias=None, ignore_index=-100) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N,H), weight (V,H), targets (N,) int64 -> (logp (N,) fp32, lse (N,) fp32). Ignored rows: logp 0.

    lse is computed for every row, ignored ones included (finite whenever their logits are).
    """
    _check(x, weight, targets, bias)
    return _forward(x, weight, targets, bias, ignore_index, _launch_config(x.shape[0], x.dtype))


def linear_logprobs_backward(
    x, weight, targets, lse, grad_logp, bias=None, ignore_index=-100, needs_input_grad=(True, True, True)
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """-> (dx (N,H) or None, dW (V,H) or None, db (V,) or None), in x / weight / bias dtype, summed in fp32.

    lse is the forward's output; grad_logp (N,) is the upstream grad. Ignored rows and rows with zero grad add
    exactly nothing, even when their hidden state is NaN (torch autograd would spread 0·NaN into dW there).
    needs_input_grad = (dx, dW, db); db is None without a bias.
    """
    _check(x, weight, targets, bias)
    assert lse.shape == targets.shape == grad_logp.shape, (lse.shape, targets.shape, grad_logp.shape)
    assert len(needs_input_grad) == 3, needs_input_grad
    cfg = _launch_config(x.shape[0], x.dtype)
    return _backward(x, weight, targets, lse, grad_logp, bias, ignore_index, tuple(needs_input_grad), cfg)


class LinearLogprobsFunction(torch.autograd.Function):
    """logp = LinearLogprobsFunction.apply(x, weight, targets, bias, ignore_index); differentiable in x, weight, bias.

    Saves x, weight, bias, targets and lse (N floats), never the logits; backward recomputes them tile by tile.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, bias=None, ignore_index=-100):
        logp, lse = linear_logprobs_forward(x, weight, targets, bias, ignore_index)
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.ignore_index = ignore_index
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        x, weight, bias, targets, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        dx, dw, db = linear_logprobs_backward(x, weight, targets, lse, grad_logp, bias, ctx.ignore_index, needs)
        return dx, dw, None, db, None

