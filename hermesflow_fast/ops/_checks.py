"""Input validation shared by the fused head ops: every message names the argument and the shapes."""

from __future__ import annotations

import os

import torch


def debug_checks() -> bool:
    """``HFF_DEBUG=1`` turns on checks that need a host sync on CUDA (target range as a ValueError)."""
    return os.environ.get("HFF_DEBUG", "0") not in ("", "0")


def check_linear_head(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    hidden_name: str = "hidden",
    weight_name: str = "weight",
    bias_name: str = "bias",
) -> None:
    """Shapes, dtypes, devices and target range of a (hidden, weight, targets, bias) head call.

    hidden (..., H) and targets (...) of the same leading shape; weight (V, H); bias (V,).
    Target range: always checked on CPU (ValueError); on CUDA a device-side assert (no host sync), or a ValueError
    under HFF_DEBUG=1.
    """
    for name, t in ((hidden_name, hidden), (weight_name, weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"{op}: {hidden_name} must have shape (N, H) or (B, T, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: {weight_name} must have shape (V, H), got {tuple(weight.shape)}")
    v, h = weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(
            f"{op}: {hidden_name} has hidden size {hidden.shape[-1]} (shape {tuple(hidden.shape)}) but {weight_name} "
            f"has shape {tuple(weight.shape)} (V, H={h})"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: targets must have shape {tuple(hidden.shape[:-1])} to match {hidden_name} "
            f"{tuple(hidden.shape)}, got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{op}: targets must be an integer tensor, got {targets.dtype}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(
            f"{op}: {hidden_name} and {weight_name} must be floating point, got {hidden.dtype}, {weight.dtype}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{op}: {hidden_name} is {hidden.dtype} but {weight_name} is {weight.dtype}; cast one of them")
    devices = {hidden_name: hidden.device, weight_name: weight.device, "targets": targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != v:
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(
                f"{op}: {bias_name} must have shape (V,)=({v},) to match {weight_name} {tuple(weight.shape)}, "
                f"got {shape}"
            )
        if bias.dtype != weight.dtype:
            raise ValueError(f"{op}: {bias_name} is {bias.dtype} but {weight_name} is {weight.dtype}")
        devices[bias_name] = bias.device
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{k}={d}" for k, d in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {where}")
    if hidden.numel() == 0 or v == 0 or h == 0:
        raise ValueError(
            f"{op}: empty input: {hidden_name} {tuple(hidden.shape)}, {weight_name} {tuple(weight.shape)}"
        )
    check_target_range(op, targets, v, ignore_index)


def check_target_range(op: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.device.type == "cpu" or debug_checks():
        if bool(bad.any()):
            idx = int(bad.flatten().nonzero()[0, 0])
            raise ValueError(
                f"{op}: targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"{int(bad.sum())} do not, e.g. targets.flatten()[{idx}] = {int(targets.flatten()[idx])}"
            )
    else:  # device-side assert: no host sync in the hot path
        torch._assert_async(~bad.any(), f"{op}: targets out of [0, {vocab}) (set HFF_DEBUG=1 for details)")


def autocast_cast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under an active ``torch.autocast`` of the tensors' device, the floating tensors cast to autocast's dtype
    (differentiably: gradients flow back to the originals in their own dtype), as autocast would cast a matmul's
    inputs; otherwise unchanged. The fused head ops call it on entry and then run with autocast off, so their GEMMs
    take autocast's dtype and keep their fp32 accumulation whatever mix of dtypes the caller holds (e.g. fp32 hidden
    states out of a final LayerNorm and fp32 master weights under bf16 autocast)."""
    first = next((t for t in tensors if t is not None), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def autocast_off(device: torch.device) -> torch.autocast:
    """A context that turns autocast off on ``device``'s type (run after :func:`autocast_cast`)."""
    return torch.autocast(device.type, enabled=False)
