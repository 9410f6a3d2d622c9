"""Fused linear head + log-softmax + target gather, as Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1).

Math (per row t; x (N, H) hidden, W (V, H) LM head, b (V,) optional bias, y (N,) int64 targets):

    z_t      = x_t Wᵀ + b                                   (V,)  never written to HBM, only (BLOCK_M, BLOCK_N) tiles
    lse_t    = logsumexp_v z_t,v
    logp_t   = z_t,y_t − lse_t,        0 where y_t == ignore_index
    backward, with upstream g (N,):
    dz_t     = g_t · (onehot(y_t) − softmax(z_t)),   0 on ignored rows
    dx = dz W (N, H),   dW = dzᵀ x (V, H),   db = Σ_t dz_t (V,)

Everything is accumulated in fp32 whatever the input dtype: logp and lse come out fp32, and every element of dx /
dW / db is an fp32 sum rounded once to x / W / b's dtype (bf16 running sums of dW degrade training: Liger #512,
#830, #1391). The design is Apple's Cut Cross-Entropy (arXiv 2411.09009) without its gradient filtering, whose
approximation is not safe for DPO's difference of two nearly equal log-likelihoods (perf-anchors §2.2, §2.5):

    forward   `_fwd_kernel`, grid (cdiv(N, BLOCK_M), splits). A program owns a row block and a contiguous run of
              vocab tiles. Per tile: a K-loop of `tl.dot` over H builds the fp32 logits tile, the bias is added,
              columns ≥ V are set to −inf, and an online (max, sum-exp) per row is updated — flash-attention's
              rescaling trick — while the target logit is picked when y_t falls in the tile. Each split writes its
              partial lse and target logit; `_combine_kernel` merges the splits (N·splits floats) and zeroes the
              ignored rows. 1 GEMM of N·H·V; only lse (N floats) is kept for backward.

Backward, two designs (``dw_mode``; "auto" picks "owned" for fp16 / bf16 inputs and "atomic" for fp32). In both,
rows that are ignored or have g = 0 are dead: they add exactly nothing, even when their hidden state is NaN (their
x is not loaded where 0·NaN could reach dW: always in "atomic"; in "owned", whose dW loop prefetches better
without that mask, only when some of x is not finite, a flag computed on the device), and their dx rows are
exactly 0. G below is one N×H×V GEMM, 2·N·H·V FLOPs.

    atomic    `_bwd_kernel`, 1-D grid over (row block, vocab tile) pairs, GROUP_M-swizzled so that concurrent
              programs share W and x tiles in L2. A program recomputes its logits tile (K-loop as above), forms
              dz = g·(onehot − exp(z − lse)) in registers, then walks H again in BLOCK_K chunks and adds
              dz @ W[tile] into dx[rows] and dzᵀ @ x[rows] into dW[tile] with relaxed fp32 `tl.atomic_add`; db gets
              a column sum of dz the same way. 3 G. The fp32 buffers are the price: 4·(N·H + V·H + V) bytes beside
              the gradients for 16-bit inputs (nothing extra for fp32 inputs, where they are the gradients), and
              N·H·V·(1/BLOCK_N + 1/BLOCK_M) fp32 atomics into L2 [est: ~15 G adds at N=8192, H=2048, V=58,498,
              128×128 tiles]; dx / dW are run-to-run nondeterministic in the last fp32 bits.
    owned     every output tile is produced once, by a program that sums its fp32 accumulator over the whole
              contraction and stores it once in the gradient's dtype; no atomics, no fp32 (V, H) buffer, and the
              summation order is fixed (run-to-run deterministic). Two passes over a bounded dz scratch:
      vocabulary pass, for Vc-column chunks c of the vocabulary (`_dz_kernel`, then `_dw_kernel`):
              dz[:, c] (N, Vc) = g·(onehot − softmax), recomputed from x, W[c], b[c] and the saved lse, written in
              the input dtype (the same rounding the atomic kernel applies to its MMA operand); the fp32 column
              sums of each (row block, tile) go to a (row blocks, Vc) partial buffer, summed into db[c].
              dW[c] = dz[:, c]ᵀ x: a tile (BLOCK_N, BLOCK_H) of dW loops over all N tokens. 2 G.
      dx, one of (`plan_owned_backward` picks):
        one pass  when an fp32 (N, H) accumulator fits the budget: acc += dz[:, c] W[c] after each chunk
              (`_dx_kernel` ACCUMULATE), cast to dx once at the end. +1 G, and 8·N·H bytes of read-modify-write
              per chunk, which beats recomputing the logits while Vc > 4·FLOP/s ÷ bytes/s ≈ 790 on an H100
              (~660 TFLOP/s reached, 3.35 TB/s): hence ONE_PASS_MIN_COLS = 1024.
        row pass  otherwise: for Nr-row chunks r, dz[r, :] (Nr, V) is recomputed over the whole vocabulary and
              dx[r] = dz[r, :] W is one tile loop over all V (`_dx_kernel`), written once. +2 G.
      Chunks are as large as the scratch budget allows, BUDGET_FRACTION = 0.18 of the inputs + gradients (x, W, b,
      dx, dW, db), evened out over the vocabulary / rows and rounded to whole tiles; the scratch is allocated once
      per pass, its rows padded to 64 elements (aligned loads whatever V), and reused by every chunk.
      `backward_extra_bytes` is the model of the peak, allocation by allocation.

See kernels/linear_logprobs_plan.py for the alternatives weighed (with the numbers at the H100 shape) and the
launch tuning; kernels/linear_logprobs_owned.py for the owned backward's launchers.

Tests:   TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -m interpret tests/kernels/test_linear_logprobs*.py
         .venv/bin/python -m pytest -q -m "not interpret" tests/kernels/test_linear_logprobs_owned.py  (plan, model)
         .venv/bin/python -m pytest -q tests/kernels/test_linear_logprobs_compile.py   (sm_90 cubins, no GPU needed)
         .venv/bin/python -m pytest -q -m gpu tests/kernels/test_linear_logprobs.py   (CUDA: bf16 vs fp64, peak memory)
Bench:   make bench   (hermesflow bench logprobs; reference in hermesflow_fast/ops/reference.py)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the module still imports; the ops layer falls back to the reference
    triton = tl = None
    HAS_TRITON = False

from .linear_logprobs_plan import (  # noqa: F401 - the plan's names stay importable from here
    BUDGET_FRACTION,
    DW_MODES,
    MIN_TILES_PER_SPLIT,
    ONE_PASS_MIN_COLS,
    SCRATCH_ALIGN,
    WAVES,
    LaunchConfig,
    OwnedPlan,
    _cdiv,
    _fixed_bytes,
    _interpreting,
    _launch_config,
    _needs,
    _next_pow2,
    _num_sms,
    _padded,
    backward_extra_bytes,
    backward_gemm_flops,
    inputs_and_grads_bytes,
    plan_owned_backward,
    resolve_dw_mode,
)

__all__ = [
    "DW_MODES",
    "HAS_TRITON",
    "LaunchConfig",
    "LinearLogprobsFunction",
    "OwnedPlan",
    "backward_extra_bytes",
    "backward_gemm_flops",
    "inputs_and_grads_bytes",
    "linear_logprobs_backward",
    "linear_logprobs_forward",
    "plan_owned_backward",
    "resolve_dw_mode",
]

# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b with fp32 accumulation. UPCAST is set only for bf16 under the interpreter (whose bf16 `tl.dot`
        multiplies raw bits): the operands go to fp32 first, which is exact for bf16 products, so the interpreter
        still checks the bf16 data path (loads, dz rounded to bf16, stores in bf16)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 x in ``dtype``, rounded to nearest even. With UPCAST (bf16 under the interpreter, whose fp32 -> bf16
        cast truncates) the bits are rounded here first, so that the interpreter rounds as the GPU does."""
        if UPCAST:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        return x.to(dtype)

    @triton.jit
    def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of a 1-D program id, GROUP_M row blocks sweeping the columns together (L2 reuse)."""
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m

    @triton.jit
    def _logits_tile(
        x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
            acc = _mma(xt, wt, acc, DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return tl.where(col_ok[None, :], acc, float("-inf"))

    @triton.jit
    def _fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, lse_part_ptr, tgt_part_ptr,
        N, H, V, stride_x, stride_w, tiles_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
                HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST,
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
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Recompute one (row block, vocab tile) of logits; atomically add its share of dx, dW and db (fp32)."""
        # GROUP_M row blocks sweep the vocab together: their W tiles and x rows stay hot in L2.
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)

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
                HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST,
            )  # (BM, BN)
            lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
            p = tl.exp(z - lse[:, None])  # softmax; 0 in columns ≥ V
            dz = tl.where(cols[None, :] == y[:, None], 1.0 - p, -p) * g[:, None]
            dz = tl.where(live[:, None], dz, 0.0)  # where, not ·0: a dead row's logits may be NaN
            if COMPUTE_DB:
                tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
            # MMA operands in the input dtype (as flash-attn's dS), fp32 accumulation and fp32 atomics.
            dz_op = _cast(dz, x_ptr.dtype.element_ty, UPCAST)
            dx_rows = dx_ptr + rows.to(tl.int64)[:, None] * H  # (BM, 1)
            dw_cols = dw_ptr + cols.to(tl.int64)[:, None] * H  # (BN, 1)
            x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # (BM, 1)
            w_cols = w_ptr + cols.to(tl.int64)[:, None] * stride_w  # (BN, 1)
            for k in range(0, H, BLOCK_K):
                ks = (k + tl.arange(0, BLOCK_K))[None, :]  # (1, BK)
                k_ok = ks < H
                if COMPUTE_DX:
                    wt = tl.load(w_cols + ks, mask=col_ok[:, None] & k_ok, other=0.0)  # (BN, BK)
                    dxt = _mma(dz_op, wt, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), DOT_PRECISION, UPCAST)
                    tl.atomic_add(dx_rows + ks, dxt, mask=live[:, None] & k_ok, sem="relaxed")
                if COMPUTE_DW:
                    # Dead rows are not even loaded: their dz is 0, and 0·NaN would poison dW.
                    xt = tl.load(x_rows + ks, mask=live[:, None] & k_ok, other=0.0)  # (BM, BK)
                    dwt = _mma(tl.trans(dz_op), xt, tl.zeros((BLOCK_N, BLOCK_K), tl.float32), DOT_PRECISION,
                               UPCAST)
                    tl.atomic_add(dw_cols + ks, dwt, mask=col_ok[:, None] & k_ok, sem="relaxed")

    # --- dw_mode="owned": every output tile written once, no atomics -------------------------------------------------

    @triton.jit
    def _dz_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr, dbp_ptr,
        row0, n_rows, col0, n_cols, n_cols_pad, H, stride_x, stride_w, stride_dz, stride_dbp,
        HAS_BIAS: tl.constexpr, COMPUTE_DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """dz[r, c] = g·(onehot − softmax) of rows row0 + r, columns col0 + c, into the scratch in its dtype.

        1-D grid over the (row block, vocab tile) pairs of the n_rows × n_cols_pad window. g is the effective
        upstream grad (0 on ignored rows); dead rows (g = 0) get dz = 0 and their x is never loaded. Columns
        [n_cols, n_cols_pad) (the scratch's row padding, n_cols_pad a multiple of SCRATCH_ALIGN) get exact zeros, so
        that the GEMMs read dz under a mask they can vectorize. COMPUTE_DB: the fp32 column sums of the tile go to
        dbp[pid_m, c] (one row of partial db per row block, summed by the launcher).
        """
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_cols_pad, BLOCK_N), GROUP_M)
        loc_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        loc_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = loc_r < n_rows
        col_ok = loc_c < n_cols
        rows = row0 + loc_r
        cols = col0 + loc_c
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # (BM,) fp32
        live = g != 0.0  # NaN != 0: a NaN grad still propagates
        dz = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if tl.sum(live.to(tl.int32), axis=0) > 0:
            z = _logits_tile(
                x_ptr, w_ptr, b_ptr, rows, cols, live, col_ok, H, stride_x, stride_w,
                HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST,
            )  # (BM, BN) fp32, −inf past the window
            y = tl.load(y_ptr + rows, mask=live, other=-1)
            lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
            p = tl.exp(z - lse[:, None])
            dz = tl.where(cols[None, :] == y[:, None], 1.0 - p, -p) * g[:, None]
            dz = tl.where(live[:, None], dz, 0.0)  # where, not ·0: a dead row's logits may be NaN
        out = dz_ptr + loc_r.to(tl.int64)[:, None] * stride_dz + loc_c[None, :]
        tl.store(out, _cast(dz, dz_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (loc_c < n_cols_pad)[None, :])
        if COMPUTE_DB:
            tl.store(dbp_ptr + pid_m * stride_dbp + loc_c, tl.sum(dz, axis=0), mask=col_ok)

    @triton.jit
    def _dw_sum(
        dz_ptr, x_ptr, g_ptr, vs, hs, v_in, h_ok, N, stride_dz, stride_x,
        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, MASK_DEAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Σ_t dz[t, vs]ᵀ x[t, hs] over all N tokens, fp32 (BLOCK_V, BLOCK_H); v_in: the scratch columns to read
        (its padding included: zeros). MASK_DEAD: dead tokens' x is not loaded. The mask then depends on a load of
        the same iteration, which keeps Triton's pipeliner from prefetching x; without it both operands are
        prefetched."""
        acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
        for t0 in range(0, N, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            t_ok = ts < N
            if MASK_DEAD:
                x_rows = (tl.load(g_ptr + ts, mask=t_ok, other=0.0) != 0.0) & t_ok
            else:
                x_rows = t_ok
            a = tl.load(
                dz_ptr + ts.to(tl.int64)[:, None] * stride_dz + vs[None, :], mask=t_ok[:, None] & v_in[None, :],
                other=0.0,
            )  # (BT, BV)
            xt = tl.load(
                x_ptr + ts.to(tl.int64)[:, None] * stride_x + hs[None, :], mask=x_rows[:, None] & h_ok[None, :],
                other=0.0,
            )  # (BT, BH)
            acc = _mma(tl.trans(a), xt, acc, DOT_PRECISION, UPCAST)
        return acc

    @triton.jit
    def _dw_kernel(
        dz_ptr, x_ptr, g_ptr, finite_ptr, dw_ptr, N, H, col0, n_cols, n_cols_pad, stride_dz, stride_x, stride_dw,
        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """dW[col0 + v, h] = Σ_t dz[t, v]·x[t, h] over all N tokens for one (BLOCK_V, BLOCK_H) tile.

        The tile owns its output: an fp32 accumulator over every token, one store in W's dtype. Dead tokens have
        dz = 0, so their x only matters when it is not finite (0·NaN would poison dW): finite_ptr holds 1 when all
        of x is finite (the usual case: the prefetched loop), else 0 (dead tokens' x is masked off)."""
        pid_v, pid_h = _grouped(tl.program_id(0), tl.cdiv(n_cols, BLOCK_V), tl.cdiv(H, BLOCK_H), GROUP_M)
        vs = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        v_ok = vs < n_cols
        v_in = vs < n_cols_pad
        h_ok = hs < H
        if tl.load(finite_ptr) != 0:
            acc = _dw_sum(dz_ptr, x_ptr, g_ptr, vs, hs, v_in, h_ok, N, stride_dz, stride_x,
                          BLOCK_V, BLOCK_H, BLOCK_T, False, DOT_PRECISION, UPCAST)
        else:
            acc = _dw_sum(dz_ptr, x_ptr, g_ptr, vs, hs, v_in, h_ok, N, stride_dz, stride_x,
                          BLOCK_V, BLOCK_H, BLOCK_T, True, DOT_PRECISION, UPCAST)
        out = dw_ptr + (col0 + vs).to(tl.int64)[:, None] * stride_dw + hs[None, :]
        tl.store(out, _cast(acc, dw_ptr.dtype.element_ty, UPCAST), mask=v_ok[:, None] & h_ok[None, :])

    @triton.jit
    def _dx_kernel(
        dz_ptr, w_ptr, g_ptr, out_ptr, row0, n_rows, H, col0, n_cols, n_cols_pad, stride_dz, stride_w, stride_out,
        ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_OUT: tl.constexpr,
    ):
        """out[row0 + m, h] (+)= Σ_v dz[m, v]·W[col0 + v, h] for one (BLOCK_M, BLOCK_H) tile; dead rows get 0.

        ACCUMULATE: out is the fp32 (N, H) accumulator of the one-pass plan, read, added to and written back once
        per vocab chunk. Else out is dx itself and dz holds every column: the tile is written once, in dx's dtype.
        """
        pid_m, pid_h = _grouped(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(H, BLOCK_H), GROUP_M)
        loc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = loc < n_rows
        h_ok = hs < H
        rows = row0 + loc
        live = tl.load(g_ptr + rows, mask=row_ok, other=0.0) != 0.0
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + hs[None, :]
        mask = row_ok[:, None] & h_ok[None, :]
        if ACCUMULATE:
            acc = tl.load(out, mask=mask, other=0.0)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        if tl.sum(live.to(tl.int32), axis=0) > 0:
            for v0 in range(0, n_cols, BLOCK_V):
                vs = v0 + tl.arange(0, BLOCK_V)
                v_ok = vs < n_cols
                a = tl.load(
                    dz_ptr + loc.to(tl.int64)[:, None] * stride_dz + vs[None, :],
                    mask=row_ok[:, None] & (vs < n_cols_pad)[None, :], other=0.0,
                )  # (BM, BV), the padding columns are zeros
                wt = tl.load(
                    w_ptr + (col0 + vs).to(tl.int64)[:, None] * stride_w + hs[None, :],
                    mask=v_ok[:, None] & h_ok[None, :], other=0.0,
                )  # (BV, BH)
                acc = _mma(a, wt, acc, DOT_PRECISION, UPCAST)
        tl.store(out, _cast(tl.where(live[:, None], acc, 0.0), out_ptr.dtype.element_ty, ROUND_OUT), mask=mask)


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


def _upcast(dtype: torch.dtype) -> bool:
    """bf16 MMA operands go through fp32 under the interpreter only (see `_mma`)."""
    return dtype == torch.bfloat16 and _interpreting()


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
            DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_upcast(x.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        block = 64 if _interpreting() else 1024
        _combine_kernel[(triton.cdiv(n, block),)](
            lse_part, tgt_part, targets, logp, lse, n, splits, ignore_index, BLOCK=block
        )
    return logp, lse


def _backward_atomic(x, weight, targets, lse, grad_logp, bias, ignore_index, needs_input_grad, cfg: LaunchConfig):
    need_dx, need_dw, need_db = _needs(needs_input_grad, bias is not None)
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
                HAS_BIAS=bias is not None, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_upcast(x.dtype), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
    return (
        dx.to(x.dtype) if dx is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )


def _backward(x, weight, targets, lse, grad_logp, bias, ignore_index, needs_input_grad, cfg: LaunchConfig,
              dw_mode: str = "auto", plan: OwnedPlan | None = None):
    if resolve_dw_mode(dw_mode, x.dtype) == "atomic":
        return _backward_atomic(x, weight, targets, lse, grad_logp, bias, ignore_index, needs_input_grad, cfg)
    from .linear_logprobs_owned import backward_owned

    return backward_owned(x, weight, targets, lse, grad_logp, bias, ignore_index, needs_input_grad, cfg, plan)


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
    x, weight, targets, lse, grad_logp, bias=None, ignore_index=-100, needs_input_grad=(True, True, True),
    dw_mode="auto",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """-> (dx (N,H) or None, dW (V,H) or None, db (V,) or None), in x / weight / bias dtype, summed in fp32.

    lse is the forward's output; grad_logp (N,) is the upstream grad. Ignored rows and rows with zero grad add
    exactly nothing, even when their hidden state is NaN (torch autograd would spread 0·NaN into dW there).
    needs_input_grad = (dx, dW, db); db is None without a bias. dw_mode: "owned" (every output tile written once,
    deterministic, bounded scratch: :func:`backward_extra_bytes`), "atomic" (fp32 atomics into fp32 dx / dW / db
    buffers, cast at the end), or "auto" (owned for fp16 / bf16 inputs, atomic for fp32).
    """
    _check(x, weight, targets, bias)
    assert lse.shape == targets.shape == grad_logp.shape, (lse.shape, targets.shape, grad_logp.shape)
    assert len(needs_input_grad) == 3, needs_input_grad
    cfg = _launch_config(x.shape[0], x.dtype)
    return _backward(x, weight, targets, lse, grad_logp, bias, ignore_index, tuple(needs_input_grad), cfg, dw_mode)


class LinearLogprobsFunction(torch.autograd.Function):
    """logp = LinearLogprobsFunction.apply(x, weight, targets, bias, ignore_index, dw_mode); differentiable in x,
    weight, bias. dw_mode: "auto" (default), "owned" or "atomic", see :func:`linear_logprobs_backward`.

    Saves x, weight, bias, targets and lse (N floats), never the logits; backward recomputes them tile by tile.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, bias=None, ignore_index=-100, dw_mode="auto"):
        resolve_dw_mode(dw_mode, x.dtype)  # an unknown mode fails here, not in backward
        logp, lse = linear_logprobs_forward(x, weight, targets, bias, ignore_index)
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.dw_mode = dw_mode
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        x, weight, bias, targets, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        dx, dw, db = linear_logprobs_backward(
            x, weight, targets, lse, grad_logp, bias, ctx.ignore_index, needs, ctx.dw_mode
        )
        return dx, dw, None, db, None, None
