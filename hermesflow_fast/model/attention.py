"""Attention backends behind one call: ``attend(q, k, v, mask, backend)``.

    q (B, H, Tq, D), k/v (B, H, Tk, D), Tq <= Tk: the queries are the LAST Tq positions (a KV-cached step)
    mask: OmniMask (structured tags, model/masks.py) | bool (B, Tq, Tk) / (B, 1, Tq, Tk), True = may attend | None
          (None = full bidirectional attention)
    -> (B, H, Tq, D)

Backends: "sdpa" (boolean mask, any device: the CPU training path), "eager" (plain matmul/softmax: the dense
reference the tests compare against).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hermesflow_fast.model.masks import OmniMask, as_dense_mask

__all__ = ["BACKENDS", "attend", "eager_attention"]

BACKENDS = ("auto", "sdpa", "eager")


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> Tensor:
    """Dense reference: softmax(q kᵀ · scale + mask) v in fp32; mask (B, 1, Tq, Tk) bool or None."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: OmniMask | Tensor | None = None, backend: str = "auto",
    scale: float | None = None,
) -> Tensor:
    B, _, Tq, _ = q.shape
    Tk = k.shape[-2]
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    dense = as_dense_mask(mask, B, Tq, Tk)
    if backend == "eager":
        return eager_attention(q, k, v, dense, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
