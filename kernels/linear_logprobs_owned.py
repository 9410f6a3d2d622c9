"""The owned backward's launchers (kernels/linear_logprobs.py's module docstring, "owned"): a vocabulary pass
writing each dW / db tile once from a bounded dz scratch, dx through an fp32 accumulator or a row pass; the
allocations are what ``backward_extra_bytes`` models (kernels/linear_logprobs_plan.py)."""

from __future__ import annotations

import torch

from .linear_logprobs import _device_guard, _dot_precision, _dw_kernel, _dx_kernel, _dz_kernel, _upcast, triton
from .linear_logprobs_plan import LaunchConfig, OwnedPlan, _needs, _padded, plan_owned_backward

__all__ = ["backward_owned"]


def _launch_dz(x, weight, bias, targets, lse, g, dz, dbp, row0, col0, cfg: LaunchConfig, common: dict) -> None:
    """dz (n_rows, n_cols) view of a scratch whose rows hold _padded(n_cols) elements <- g·(onehot − softmax) of
    rows row0.., columns col0.., zeros in the padding; dbp: the (row blocks, n_cols) partial db view or None."""
    n_rows, n_cols = dz.shape
    n_pad = _padded(n_cols)  # ≤ dz.stride(0): the scratch's rows are padded
    grid = (triton.cdiv(n_rows, cfg.block_m) * triton.cdiv(n_pad, cfg.block_n),)
    _dz_kernel[grid](
        x, weight, bias if bias is not None else x, targets, lse, g, dz, dbp if dbp is not None else g,
        row0, n_rows, col0, n_cols, n_pad, x.shape[1], x.stride(0), weight.stride(0), dz.stride(0),
        dbp.stride(0) if dbp is not None else 0,
        HAS_BIAS=bias is not None, COMPUTE_DB=dbp is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, **common,
    )


def _launch_dx(dz, weight, g, out, row0, col0, accumulate: bool, cfg: LaunchConfig, common: dict) -> None:
    """out[row0 : row0 + n_rows] (+)= dz · W[col0 : col0 + n_cols] (see `_dx_kernel`)."""
    n_rows, n_cols = dz.shape
    h = weight.shape[1]
    grid = (triton.cdiv(n_rows, cfg.block_m) * triton.cdiv(h, cfg.block_h),)
    _dx_kernel[grid](
        dz, weight, g, out, row0, n_rows, h, col0, n_cols, _padded(n_cols), dz.stride(0), weight.stride(0),
        out.stride(0),
        ACCUMULATE=accumulate, BLOCK_M=cfg.block_m, BLOCK_H=cfg.block_h, BLOCK_V=cfg.block_k, GROUP_M=cfg.group_m,
        ROUND_OUT=common["UPCAST"] and not accumulate, **common,
    )


def _vocab_pass(x, weight, bias, targets, lse, g, dx, dw, db, plan: OwnedPlan, cfg: LaunchConfig, common: dict,
                x_finite: torch.Tensor | None = None):
    """dW and db (those not None) by chunks of Vc vocabulary columns, and dx if given through an fp32 accumulator.
    x_finite: int32 (1,), 1 when all of x is finite (see `_dw_kernel`). The scratch dies with the call (a view
    left in a loop variable would keep it alive into the row pass)."""
    n, h = x.shape
    v = weight.shape[0]
    vc = min(plan.vocab_chunk, v)
    scratch = torch.empty((n, _padded(vc)), device=x.device, dtype=x.dtype)
    partial = torch.empty((triton.cdiv(n, cfg.block_m), vc), device=x.device, dtype=torch.float32) if db is not None \
        else None
    acc = torch.zeros((n, h), device=x.device, dtype=torch.float32) if dx is not None else None
    for c0 in range(0, v, vc):
        nc = min(vc, v - c0)
        dz = scratch[:, :nc]
        dbp = partial[:, :nc] if db is not None else None
        _launch_dz(x, weight, bias, targets, lse, g, dz, dbp, 0, c0, cfg, common)
        if dw is not None:
            grid = (triton.cdiv(nc, cfg.block_n) * triton.cdiv(h, cfg.block_h),)
            _dw_kernel[grid](
                dz, x, g, x_finite, dw, n, h, c0, nc, _padded(nc), dz.stride(0), x.stride(0), dw.stride(0),
                BLOCK_V=cfg.block_n, BLOCK_H=cfg.block_h, BLOCK_T=cfg.block_k, GROUP_M=cfg.group_m, **common,
            )
        if db is not None:
            db[c0 : c0 + nc] = dbp.sum(0)
        if dx is not None:
            _launch_dx(dz, weight, g, acc, 0, c0, True, cfg, common)
    if dx is not None:
        dx.copy_(acc)


def _row_pass(x, weight, bias, targets, lse, g, dx, plan: OwnedPlan, cfg: LaunchConfig, common: dict):
    """dx by chunks of Nr rows, each chunk's dz recomputed over the whole vocabulary and contracted with W once."""
    n = x.shape[0]
    nr = min(plan.row_chunk, n)
    v = weight.shape[0]
    scratch = torch.empty((nr, _padded(v)), device=x.device, dtype=x.dtype)
    for r0 in range(0, n, nr):
        dz = scratch[: min(nr, n - r0), :v]
        _launch_dz(x, weight, bias, targets, lse, g, dz, None, r0, 0, cfg, common)
        _launch_dx(dz, weight, g, dx, r0, 0, False, cfg, common)


def backward_owned(x, weight, targets, lse, grad_logp, bias, ignore_index, needs_input_grad, cfg: LaunchConfig,
                    plan: OwnedPlan | None = None):
    """dx, dW, db with every output tile written once (module docstring, "owned"); allocations as
    :func:`backward_extra_bytes` models them."""
    need_dx, need_dw, need_db = _needs(needs_input_grad, bias is not None)
    n, h = x.shape
    v = weight.shape[0]
    dx = torch.empty((n, h), device=x.device, dtype=x.dtype) if need_dx else None
    dw = torch.empty((v, h), device=x.device, dtype=weight.dtype) if need_dw else None
    db = torch.empty((v,), device=x.device, dtype=bias.dtype) if need_db else None
    if n == 0 or not (need_dx or need_dw or need_db):
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db
    if plan is None:
        plan = plan_owned_backward(n, h, v, x.dtype, bias=bias is not None, needs=(need_dx, need_dw, need_db),
                                   cfg=cfg)
    # the effective upstream grad: 0 on ignored rows, so that a kernel knows a dead row from g alone
    g = torch.where(targets != ignore_index, grad_logp.to(torch.float32), 0.0)
    lse = lse.to(torch.float32).contiguous()
    common = {"DOT_PRECISION": _dot_precision(x.dtype), "UPCAST": _upcast(x.dtype), "num_warps": cfg.num_warps,
              "num_stages": cfg.num_stages}
    dx_in_vocab_pass = need_dx and plan.dx_in_vocab_pass
    with _device_guard(x):
        if need_dw or need_db or dx_in_vocab_pass:
            # one read of x, no host sync: the dW kernel masks dead tokens' x only when some of x is not finite
            x_finite = torch.isfinite(torch.linalg.vector_norm(x, float("inf"))).to(torch.int32).reshape(1) \
                if need_dw else None
            _vocab_pass(x, weight, bias, targets, lse, g, dx if dx_in_vocab_pass else None, dw, db, plan, cfg, common,
                        x_finite)
        if need_dx and not dx_in_vocab_pass:
            _row_pass(x, weight, bias, targets, lse, g, dx, plan, cfg, common)
    return dx, dw, db
