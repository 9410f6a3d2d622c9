"""Mask plans: everything the attention backends derive from one mask, built once per mask object.

A transformer calls ``attend`` from every layer with the same mask object, so everything derived from a mask (the
dense boolean mask, the FlexAttention BlockMask, the varlen segment plan) is built once and kept in that mask's
``MaskPlan``. ``prepare(mask)`` returns it: plans are cached by the mask object's identity (a weak reference; the
entry goes when the mask is garbage collected, at most ``_PLAN_CACHE_SIZE`` entries), so ``attend(q, k, v, mask)``
from 24 layers builds each structure once. A plan rebuilds if the mask's tensors are modified in place (their
version counters change). Under ``torch.compile`` of a whole model, call ``prepare(mask)`` outside the compiled
region and pass the plan as the mask (a traced ``attend`` given a raw mask skips the cache and rebuilds on every
call).

What a plan holds, per (B, Tq, Tk, device): ``dense`` (bool (B, 1, Tq, Tk), SDPA / eager), ``block_mask`` (the
FlexAttention BlockMask, ``block_mask_from_dense``), ``groups`` (``GroupPlan``: the SDPA split by segment and branch,
kept only when it scores at most ``SPLIT_MAX_WORK`` of the dense call's entries) and ``varlen`` (``VarlenPlan``: the
flash decomposition below). ``attend`` (model/attention.py) runs them.

The flash decomposition (every OmniMask, exact). Per row, the query positions are cut into runs: a maximal run of
consecutive valid tokens with the same (block, branch) tags. A block run (block b >= 0) is one NON-causal segment;
its keys are the rule's visible set of its first token, {j : allowed(first, j)} (earlier visible tokens, every member
of block b wherever it sits, nothing of another branch): every member of the run has exactly this set, since the
only tokens between two members are members. A causal run is one CAUSAL segment whose keys are the visible tokens
before the run followed by the run itself; flash's bottom-right aligned causal mask then gives the run's m-th
token the prefix plus run tokens 0..m, which is the rule. All non-causal segments go in one varlen call, all causal
ones in another; K/V are gathered per segment (a shared prefix is gathered once per branch that sees it; autograd
sums the duplicate dK/dV), outputs are scattered back to their rows. Pad queries (valid False) are in no segment
and their output is 0 (finite; a pad row's output is never read, pads are never keys).

    python -m pytest -q tests/model/test_mask_plan.py tests/model/test_attention.py
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hermesflow_fast.model.masks import OmniMask, as_dense_mask

__all__ = ["SPLIT_MAX_WORK", "GroupPlan", "MaskPlan", "VarlenPlan", "block_mask_from_dense", "prepare"]

SPLIT_MAX_WORK = 0.75  # "sdpa" splits an OmniMask by segment and branch when that scores <= 75% of the dense entries


class VarlenPlan:
    """The flash decomposition of one mask for (B, Tq, Tk): per varlen call (non-causal, causal) the flat query rows
    (indices into q as (B·Tq, H, D)), the gathered key rows (indices into k/v as (B·Tk, H, D)), cu_seqlens and
    max lengths. ``q_rows`` are all query rows that get an output (every valid one, exactly once)."""

    def __init__(self, calls: list[tuple[bool, Tensor, Tensor, Tensor, Tensor, int, int]], q_rows: Tensor,
                 B: int, Tq: int, Tk: int):
        self.calls = calls  # (causal, q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        self.q_rows = q_rows
        self.B, self.Tq, self.Tk = B, Tq, Tk

    @property
    def num_segments(self) -> int:
        return sum(c[3].numel() - 1 for c in self.calls)


def _runs(valid: np.ndarray, block: np.ndarray, branch: np.ndarray, segment: np.ndarray | None = None
          ) -> list[tuple[int, int]]:
    """[start, end) of the maximal runs of equal (valid, block, branch, segment) tags (pads collapse into one kind)."""
    n = valid.size
    if n == 0:
        return []
    blk = np.where(valid, np.maximum(block, -1), -2)
    br = np.where(valid, branch, -1)
    cut = (blk[1:] != blk[:-1]) | (br[1:] != br[:-1])
    if segment is not None:
        cut |= segment[1:] != segment[:-1]
    starts = [0] + (np.flatnonzero(cut) + 1).tolist()
    return list(zip(starts, starts[1:] + [n]))


def _build_varlen(mask: OmniMask | None, B: int, Tq: int, Tk: int, device: torch.device) -> VarlenPlan:
    """Segments per the module docstring; built on the host (numpy: a few small ops per run) and moved once."""
    off = Tk - Tq
    per_call: dict[bool, tuple[list, list, list, list]] = {False: ([], [], [0], [0]), True: ([], [], [0], [0])}

    def add(causal: bool, b: int, q_pos: np.ndarray, k_pos: np.ndarray) -> None:
        qi, ki, cq, ck = per_call[causal]
        qi.append(b * Tq + q_pos - off)
        ki.append(b * Tk + k_pos)
        cq.append(cq[-1] + q_pos.size)
        ck.append(ck[-1] + k_pos.size)

    if mask is None:
        for b in range(B):
            add(False, b, np.arange(off, Tk), np.arange(Tk))
    else:
        valid = mask.valid.cpu().numpy()
        block, branch = mask.block.cpu().numpy().astype(np.int64), mask.branch.cpu().numpy().astype(np.int64)
        segment = mask.segments().cpu().numpy().astype(np.int64)
        pos = np.arange(Tk)
        for b in range(B):
            vb, kb, rb, sb = valid[b], block[b], branch[b], segment[b]
            for s, e in _runs(vb[off:], kb[off:], rb[off:], sb[off:]):
                S, E = s + off, e + off
                if not vb[S]:
                    continue  # pad queries: no segment, output 0
                r, blk = rb[S], kb[S]
                sees = vb & (sb == sb[S]) & ((rb == 0) | (rb == r))  # own sequence; branch 0 or this run's
                own = np.arange(S, E)
                if blk >= 0:
                    add(False, b, own, np.flatnonzero(sees & ((pos <= S) | (kb == blk))))
                else:
                    add(True, b, own, np.concatenate([np.flatnonzero(sees[:S]), own]))
    calls, rows = [], []
    for causal in (False, True):
        qi, ki, cq, ck = per_call[causal]
        if not qi:
            continue
        q_idx = torch.from_numpy(np.concatenate(qi).astype(np.int64))
        k_idx = torch.from_numpy(np.concatenate(ki).astype(np.int64))
        cu_q, cu_k = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
        max_q, max_k = int(np.diff(cq).max()), int(np.diff(ck).max())
        calls.append((causal, q_idx.to(device), k_idx.to(device), cu_q.to(device), cu_k.to(device), max_q, max_k))
        rows.append(q_idx)
    q_rows = torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.long, device=device)
    return VarlenPlan(calls, q_rows, B, Tq, Tk)


class GroupPlan:
    """The SDPA split of one OmniMask for (B, T, T): per group, the flat query rows and key rows (indices into
    (B·T, H, D)) and the group's dense boolean mask (1, 1, nq, nk). ``q_rows``: every group's queries, in order."""

    def __init__(self, groups: list[tuple[Tensor, Tensor, Tensor]], q_rows: Tensor, work: int, dense_work: int):
        self.groups = groups
        self.q_rows = q_rows
        self.work, self.dense_work = work, dense_work  # score-matrix entries: split vs one dense call


def _build_groups(mask: OmniMask, B: int, T: int, device: torch.device) -> GroupPlan:
    """Per row, per segment: the first branch's queries (with the segment's shared tokens) over the shared tokens and
    that branch; each later branch's queries over the shared tokens and itself. Every key a valid query may see under
    the rule is in its group (its own segment, branch 0 or its own), so the split is exact; pads are in no group."""
    valid = mask.valid.cpu().numpy()
    branch = mask.branch.cpu().numpy().astype(np.int64)
    segment = mask.segments().cpu().numpy().astype(np.int64)
    groups, rows, work = [], [], 0
    for b in range(B):
        vb, rb, sb = valid[b], branch[b], segment[b]
        for s in np.unique(sb[vb]):
            pos = np.flatnonzero(vb & (sb == s))
            br = rb[pos]
            shared = br == 0
            own = [k for k in np.unique(br).tolist() if k != 0]
            for n, k in enumerate(own or [0]):
                mine = br == k
                q_pos = pos[mine | shared] if n == 0 else pos[mine]
                k_pos = pos[mine | shared]
                qt, kt = torch.from_numpy(q_pos), torch.from_numpy(k_pos)
                see = mask.allowed(torch.tensor(b), qt.to(mask.valid.device)[:, None], kt.to(mask.valid.device)[None])
                groups.append((qt.to(device) + b * T, kt.to(device) + b * T, see[None, None].to(device)))
                rows.append(qt + b * T)
                work += q_pos.size * k_pos.size
    q_rows = torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.long, device=device)
    return GroupPlan(groups, q_rows, work, B * T * T)


def _alias(mask: OmniMask | Tensor) -> OmniMask | Tensor:
    """A new object on the same tensors: the plan must not keep the caller's mask object (the cache key) alive."""
    if isinstance(mask, OmniMask):
        return OmniMask(*mask.tensors)
    return mask.detach()


class MaskPlan:
    """Everything the backends derive from one mask, built lazily and kept: ``dense`` (SDPA/eager), ``block_mask``
    (FlexAttention), ``varlen`` (flash). Get one with ``prepare(mask)``; ``attend`` accepts it as the mask."""

    def __init__(self, mask: OmniMask | Tensor | None, memo: bool = True):
        if mask is not None and not isinstance(mask, (OmniMask, Tensor)):
            raise TypeError(f"attention mask must be a bool tensor, an OmniMask or None, got {type(mask).__name__}")
        self.mask = _alias(mask) if memo and mask is not None else mask
        self._memo: dict[tuple, object] | None = {} if memo else None
        self._versions = self._version_key() if memo else ()

    def _version_key(self) -> tuple[int, ...]:
        m = self.mask
        if m is None:
            return ()
        if isinstance(m, OmniMask):
            return tuple(t._version for t in m.tensors)
        return (m._version,)

    def _get(self, key: tuple, build: Callable[[], object]):
        if self._memo is None:  # a throwaway plan (inside torch.compile): build every time
            return build()
        versions = self._version_key()
        if versions != self._versions:  # modified in place since it was planned
            self._memo.clear()
            self._versions = versions
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def is_structured(self) -> bool:
        """True for OmniMask or None (what the flash decomposition needs)."""
        return self.mask is None or isinstance(self.mask, OmniMask)

    def check(self, B: int, Tq: int, Tk: int) -> None:
        """Raise a clear error when the mask does not cover (B, Tq queries, Tk keys)."""
        m = self.mask
        if isinstance(m, OmniMask):
            if m.shape != (B, Tk):
                raise ValueError(f"attention_mask: OmniMask covers {m.shape} (B, T) but the keys are ({B}, {Tk})")
        elif m is not None:
            as_dense_mask(m, B, Tq, Tk)

    def dense(self, B: int, Tq: int, Tk: int, device: torch.device) -> Tensor | None:
        """(B, 1, Tq, Tk) bool on ``device`` (None for no mask)."""
        if self.mask is None:
            return None
        return self._get(("dense", B, Tq, Tk, device), lambda: as_dense_mask(self.mask, B, Tq, Tk).to(device))

    def block_mask(self, B: int, Tq: int, Tk: int, device: torch.device):
        """FlexAttention BlockMask (None for no mask): queries are positions Tk − Tq …"""
        if self.mask is None:
            return None

        def build():
            self.check(B, Tq, Tk)
            off = Tk - Tq
            m = self.mask.to(device) if isinstance(self.mask, OmniMask) else self.mask
            table = as_dense_mask(m, B, Tq, Tk)[:, 0].to(device)  # (B, Tq, Tk)
            if isinstance(m, OmniMask):
                inner = m.mask_mod()

                def mod(b, h, q_idx, kv_idx):
                    return inner(b, h, q_idx + off, kv_idx)
            else:

                def mod(b, h, q_idx, kv_idx):
                    return table[b, q_idx, kv_idx]

            return block_mask_from_dense(table, mod)

        return self._get(("block", B, Tq, Tk, device), build)

    def groups(self, B: int, T: int, device: torch.device) -> GroupPlan | None:
        """The SDPA split (``GroupPlan``) of an OmniMask over T queries and T keys, or None when it would score more
        than ``SPLIT_MAX_WORK`` of the dense call's entries (one plain sequence per row: nothing to skip)."""
        if not isinstance(self.mask, OmniMask):
            return None
        self.check(B, T, T)

        def build():
            plan = _build_groups(self.mask, B, T, device)
            return plan if plan.work <= SPLIT_MAX_WORK * plan.dense_work else None

        return self._get(("groups", B, T, device), build)

    def varlen(self, B: int, Tq: int, Tk: int, device: torch.device) -> VarlenPlan:
        if not self.is_structured:
            raise ValueError("backend='flash' needs an OmniMask (or no mask): a dense boolean mask has no exact "
                             "varlen decomposition; use backend='flex' or 'sdpa' for it")
        self.check(B, Tq, Tk)
        return self._get(("varlen", B, Tq, Tk, device), lambda: _build_varlen(self.mask, B, Tq, Tk, device))


_PLAN_CACHE_SIZE = 16
_PLANS: dict[int, tuple[weakref.ref, MaskPlan]] = {}


def prepare(mask: OmniMask | Tensor | MaskPlan | None) -> MaskPlan | None:
    """The (cached) MaskPlan of ``mask``: the same plan for the same mask object while it lives. None stays None."""
    if mask is None or isinstance(mask, MaskPlan):
        return mask
    key = id(mask)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    plan = MaskPlan(mask)
    while len(_PLANS) >= _PLAN_CACHE_SIZE:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = (weakref.ref(mask), plan)
    weakref.finalize(mask, _forget, key, _PLANS[key][0])
    return plan


def _forget(key: int, ref: weakref.ref) -> None:
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is ref:
        del _PLANS[key]


def block_mask_from_dense(dense: Tensor, mask_mod: Callable, block: int = 128):
    """FlexAttention BlockMask of a (B, Tq, Tk) bool mask, its tile structure read off the mask itself: a tile of
    ``block``×``block`` with every entry allowed is "full" (no ``mask_mod`` call inside), one with some allowed is
    "partial" (``mask_mod`` decides), one with none is skipped. The same structure ``create_block_mask`` derives by
    evaluating ``mask_mod`` over the whole grid, without its per-element index tensors: a packed training row of
    8,192 tokens costs a few (Tq, Tk) bool passes instead. Tiles cut by Tq or Tk count as partial."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Tq, Tk = dense.shape
    nq, nk = -(-Tq // block), -(-Tk // block)
    tiles = F.pad(dense, (0, nk * block - Tk, 0, nq * block - Tq)).view(B, nq, block, nk, block)
    some = tiles.any(4).any(2)  # (B, nq, nk)
    full = tiles.all(4).all(2)
    partial = some & ~full

    def listed(sel: Tensor) -> tuple[Tensor, Tensor]:  # per q tile: how many kv tiles, and which first
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        return sel.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(Tq, Tk))
