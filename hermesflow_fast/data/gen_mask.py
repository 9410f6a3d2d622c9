"""The generation side's mask of a pair: which image slots are replaced by [MASK] and scored.

Show-o's training draw (spec §2.2 a, §5.5), one per pair:

    t ~ U(0, 1);   r = cos(π t / 2);   k = clamp(round(N · r), 1, N);   k of the N slots, uniform without replacement

All of it comes from a ``torch.Generator`` seeded by sha256("hermesflow-gen-mask", pair id, epoch, seed), so the mask
of a pair depends on nothing else: not on the batch it lands in, the order of the pairs, the rank, or how many masks
were drawn before. The chosen and rejected images share it (x_w, x_l are scored on the same slots), and so do the
policy and the reference model, and a reference pass precomputed at pair-building time can recompute it.

    python -m pytest -q tests/data/test_gen_mask.py
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from hermesflow_fast.model.generate import cosine_schedule

__all__ = ["pair_generator", "pair_mask"]


def pair_generator(pair_id: str, epoch: int, seed: int, purpose: str = "gen-mask") -> torch.Generator:
    """A CPU generator seeded by a stable hash of (purpose, pair id, epoch, seed): the same in every process."""
    key = "\x1f".join(("hermesflow", purpose, str(pair_id), str(int(epoch)), str(int(seed))))
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def pair_mask(pair_id: str, epoch: int, seed: int, num_tokens: int) -> Tensor:
    """(N,) bool: the slots pair ``pair_id`` masks in ``epoch`` under global ``seed``; at least one, at most N."""
    if num_tokens < 1:
        raise ValueError(f"pair_mask: num_tokens must be ≥ 1, got {num_tokens} (pair {pair_id!r})")
    g = pair_generator(pair_id, epoch, seed)
    t = torch.rand((), generator=g, dtype=torch.float64)
    ratio = float(cosine_schedule(t))
    k = min(max(int(math.floor(num_tokens * ratio + 0.5)), 1), num_tokens)  # round half up
    mask = torch.zeros(num_tokens, dtype=torch.bool)  # (N,)
    mask[torch.randperm(num_tokens, generator=g)[:k]] = True
    return mask
