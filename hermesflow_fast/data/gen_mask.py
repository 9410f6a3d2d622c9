"""The generation side's masks of a pair: which image slots are replaced by [MASK] and scored.

Show-o's training draw, per mask:

    t ~ U(0, 1);   r = cos(π t / 2);   k = clamp(round(N · r), 1, N);   k of the N slots, uniform without replacement

All of it comes from a ``torch.Generator`` seeded by sha256("hermesflow-gen-mask", pair id, epoch, seed[, mask index]),
so a mask depends on nothing else: not on the batch it lands in, the order of the pairs, the rank, or how many masks
were drawn before. Mask 0 is the one draw a pair has by default; masks 1, 2, … (``train.gen_masks`` > 1) add the
index to the key, so mask 0 is the same whatever the number of masks. The chosen and rejected images share each
mask (x_w, x_l are scored on the same slots), and so do the policy and the reference model, and a reference pass
precomputed at pair-building time can recompute them.

``ratio = (lo, hi)`` bounds the mask ratio (``train.gen_mask_ratio``): r is then Show-o's cosine law conditioned on
lo ≤ r ≤ hi, t ~ U(2/π·acos(hi), 2/π·acos(lo)); (0, 1), the default, is Show-o's draw unchanged.

    python -m pytest -q tests/data/test_gen_mask.py
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hermesflow_fast.model.generate import cosine_schedule
from hermesflow_fast.seeding import hashed_generator

__all__ = ["FULL_RATIO", "check_ratio", "pair_generator", "pair_mask", "pair_masks"]

FULL_RATIO = (0.0, 1.0)


def pair_generator(pair_id: str, epoch: int, seed: int, purpose: str = "gen-mask") -> torch.Generator:
    """A CPU generator seeded by a stable hash of (purpose, pair id, epoch, seed): the same in every process."""
    return hashed_generator("hermesflow", purpose, pair_id, int(epoch), int(seed))


def check_ratio(ratio: Sequence[float]) -> tuple[float, float]:
    """``ratio`` as (lo, hi) with 0 ≤ lo ≤ hi ≤ 1 and hi > 0; ValueError otherwise."""
    if len(ratio) != 2:
        raise ValueError(f"mask ratio bounds must be two numbers (min, max), got {list(ratio)}")
    lo, hi = float(ratio[0]), float(ratio[1])
    if not (0.0 <= lo <= hi <= 1.0 and hi > 0.0):
        raise ValueError(f"mask ratio bounds (min, max) = ({lo}, {hi}) must satisfy 0 ≤ min ≤ max ≤ 1 and max > 0")
    return lo, hi


def pair_mask(pair_id: str, epoch: int, seed: int, num_tokens: int, index: int = 0,
              ratio: Sequence[float] = FULL_RATIO) -> Tensor:
    """(N,) bool: the slots mask ``index`` of pair ``pair_id`` covers in ``epoch`` under global ``seed``; at least
    one, at most N. ``ratio``: (min, max) of the mask ratio (see the module docstring)."""
    if num_tokens < 1:
        raise ValueError(f"pair_mask: num_tokens must be ≥ 1, got {num_tokens} (pair {pair_id!r})")
    if index < 0:
        raise ValueError(f"pair_mask: index must be ≥ 0, got {index} (pair {pair_id!r})")
    lo, hi = check_ratio(ratio)
    g = pair_generator(pair_id, epoch, seed, "gen-mask" if index == 0 else f"gen-mask-{index}")
    t = torch.rand((), generator=g, dtype=torch.float64)
    if (lo, hi) != FULL_RATIO:  # the cosine law restricted to lo ≤ r ≤ hi: t uniform on the matching interval
        t_lo, t_hi = 2 / math.pi * math.acos(hi), 2 / math.pi * math.acos(lo)
        t = t_lo + (t_hi - t_lo) * t
    r = float(cosine_schedule(t))
    k = min(max(int(math.floor(num_tokens * r + 0.5)), 1), num_tokens)  # round half up
    mask = torch.zeros(num_tokens, dtype=torch.bool)  # (N,)
    mask[torch.randperm(num_tokens, generator=g)[:k]] = True
    return mask


def pair_masks(pair_id: str, epoch: int, seed: int, num_tokens: int, count: int = 1,
               ratio: Sequence[float] = FULL_RATIO) -> Tensor:
    """(count, N) bool: masks 0 … count−1 of the pair (row m = ``pair_mask(…, index=m, ratio=ratio)``)."""
    if count < 1:
        raise ValueError(f"pair_masks: count must be ≥ 1, got {count} (pair {pair_id!r})")
    return torch.stack([pair_mask(pair_id, epoch, seed, num_tokens, m, ratio) for m in range(count)])
