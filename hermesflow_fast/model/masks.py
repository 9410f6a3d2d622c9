"""Structured attention masks: the omni-attention masks of Show-o and the shared-prefix packed layouts, as per-token
tags that every attention backend reads (dense boolean for SDPA, ``mask_mod`` for FlexAttention, varlen segments for
flash-attention).

Per token of each row, three tags and an optional fourth:

    valid   (B, T) bool   False for padding: a pad is never attended as a key
    block   (B, T) int32  -1: a causal token; b >= 0: member of bidirectional block b (members see each other)
    branch  (B, T) int32  0: shared, seen by every later token; k > 0: seen only by tokens of branch k
    segment (B, T) int32  optional: several packed sequences in one row; tokens see only their own segment

    allowed(i, j) = (i == j) or ( valid[j] and segment[i] == segment[j]
                                  and (branch[j] == 0 or branch[j] == branch[i])
                                  and (j <= i or (block[i] >= 0 and block[i] == block[j])) )

The diagonal is always allowed, so no row is empty (a pad row sees itself; its output is never read).

Show-o's masks in these tags:
- t2i: ``[t2i][bos] text [eos]`` causal (block −1), ``[soi] image [eoi]`` one block (block 0), pads invalid. Image rows
  see all text (earlier) and the whole block, text rows are causal, nobody sees a pad.
- mmu: ``[mmu][soi] image [eoi]`` one block, the text after it causal.
- packed pair: the shared prefix has branch 0, the chosen continuation branch 1, the rejected branch 2. Each sees the
  prefix and itself, never the other.

A dense boolean mask ``(B, T, T)`` or ``(B, 1, T, T)`` (True = may attend) is accepted everywhere too; the structured
form is what lets FlexAttention skip blocks and flash-attention run without a mask tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["OmniMask", "as_dense_mask"]


@dataclass(frozen=True)
class OmniMask:
    """Per-token mask tags; see the module docstring for the rule."""

    valid: Tensor  # (B, T) bool
    block: Tensor  # (B, T) int32
    branch: Tensor  # (B, T) int32
    segment: Tensor | None = None  # (B, T) int32; None = one sequence per row

    def __post_init__(self) -> None:
        shape = self.valid.shape
        if self.valid.dim() != 2:
            raise ValueError(f"OmniMask.valid must be (B, T), got shape {tuple(shape)}")
        for name in ("block", "branch") + (("segment",) if self.segment is not None else ()):
            t = getattr(self, name)
            if t.shape != shape:
                raise ValueError(f"OmniMask.{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like valid")
        if self.valid.dtype != torch.bool:
            raise ValueError(f"OmniMask.valid must be bool, got {self.valid.dtype}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)  # type: ignore[return-value]

    @classmethod
    def causal(cls, valid: Tensor) -> OmniMask:
        """A plain causal mask over the valid tokens of each row."""
        tags = torch.full(valid.shape, -1, dtype=torch.int32, device=valid.device)
        return cls(valid.bool(), tags, torch.zeros_like(tags))

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """(valid, block, branch[, segment]): what a copy or a cache key needs."""
        return (self.valid, self.block, self.branch) + ((self.segment,) if self.segment is not None else ())

    def to(self, device: torch.device | str) -> OmniMask:
        return OmniMask(*(t.to(device) for t in self.tensors))

    def __getitem__(self, rows) -> OmniMask:
        return OmniMask(*(t[rows] for t in self.tensors))

    def segments(self) -> Tensor:
        """(B, T) int32 segment ids (zeros when there is one sequence per row)."""
        return self.segment if self.segment is not None else torch.zeros_like(self.block)

    def allowed(self, b: Tensor, i: Tensor, j: Tensor) -> Tensor:
        """The rule on index tensors (broadcasting); the one definition dense() and FlexAttention's mask_mod use."""
        bi, bj = self.block[b, i], self.block[b, j]
        ri, rj = self.branch[b, i], self.branch[b, j]
        see = self.valid[b, j] & ((rj == 0) | (rj == ri)) & ((j <= i) | ((bi >= 0) & (bi == bj)))
        if self.segment is not None:
            see = see & (self.segment[b, i] == self.segment[b, j])
        return see | (i == j)

    def dense(self, q_start: int = 0) -> Tensor:
        """(B, T − q_start, T) bool: rows q_start… (query rows of a KV-cached step) over all T keys."""
        B, T = self.shape
        dev = self.valid.device
        b = torch.arange(B, device=dev).view(B, 1, 1)
        i = torch.arange(q_start, T, device=dev).view(1, -1, 1)
        j = torch.arange(T, device=dev).view(1, 1, T)
        return self.allowed(b, i, j)

    def mask_mod(self):
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` closing over the tags."""

        def mod(b, h, q_idx, kv_idx):
            return self.allowed(b, q_idx, kv_idx)

        return mod


def as_dense_mask(
    mask: OmniMask | Tensor | None, B: int, Tq: int, Tk: int, where: str = "attention_mask"
) -> Tensor | None:
    """A (B, 1, Tq, Tk) bool mask from any accepted form (None stays None), with a clear error on a shape mismatch."""
    if mask is None:
        return None
    if isinstance(mask, OmniMask):
        if mask.shape != (B, Tk):
            raise ValueError(f"{where}: OmniMask covers {mask.shape} (B, T) but the keys are ({B}, {Tk})")
        return mask.dense(q_start=Tk - Tq).unsqueeze(1)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where} must be a bool tensor or an OmniMask, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{where} must be bool (True = may attend), got {mask.dtype}")
    given = tuple(mask.shape)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[0] != B or mask.shape[1] != 1 or mask.shape[-2:] != (Tq, Tk):
        raise ValueError(
            f"{where} has shape {given}; expected ({B}, {Tq}, {Tk}) or ({B}, 1, {Tq}, {Tk}) "
            f"for input of batch {B} with {Tq} queries over {Tk} keys"
        )
    return mask
