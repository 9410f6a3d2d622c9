"""Attention backends behind one call: ``attend(q, k, v, mask, backend, scale)``.

    q (B, H, Tq, D), k/v (B, H, Tk, D), Tq <= Tk: the queries are the LAST Tq positions (a KV-cached step)
    mask: OmniMask (structured tags, model/masks.py) | bool (B, Tq, Tk) / (B, 1, Tq, Tk), True = may attend
          | MaskPlan (from ``prepare(mask)``) | None (= full bidirectional attention)
    -> (B, H, Tq, D)

Backends (``BACKENDS``):
  "sdpa"   F.scaled_dot_product_attention with a dense boolean mask; any device, forward + backward (the CPU path).
           An OmniMask over T queries and T keys is split first (``split_attention``): per row, per packed sequence
           (segment), one SDPA call for the shared tokens with the first branch and one per later branch over the
           shared tokens and that branch, when that scores at most ``SPLIT_MAX_WORK`` of the dense call's entries.
           No score outside a query's sequence and branches is computed: a row of four packed pairs costs the sum of
           the sequences' squares, not the row's square (on CPU, attention over 4,000-token rows went from ~35% of a
           training step to a few %). Exact; pad query rows get 0, as on the flash path. Not used while compiling.
  "flex"   FlexAttention with ``OmniMask.mask_mod()`` (or a lookup into a dense mask) and a BlockMask whose tiles
           are read off the dense mask (``block_mask_from_dense``: create_block_mask's tiles without evaluating
           mask_mod over the whole grid): compiled once per process on CUDA (fully masked 128×128 tiles skipped,
           fully allowed ones run without the mask); on CPU it runs uncompiled and
           forward only (torch has no CPU backward for it), so a CPU call that needs gradients takes "sdpa" (said
           once). Compiled CPU flex is not used (inside a compiled model on CPU "flex" runs as "sdpa"): in torch
           2.13 inductor's CPU flex kernel returned wrong values / NaN for some lengths below the block size.
  "flash"  flash-attention varlen (FA2 ``flash_attn.flash_attn_varlen_func``; FA4 ``flash_attn.cute`` when that is
           the one installed), CUDA, bf16/fp16, OmniMask only, exact (no mask tensor at all, see below).
  "eager"  matmul + softmax in fp32: the dense reference the tests compare against.
  "auto"   CUDA: "flash" for an OmniMask when flash-attn imports and the dtype is 16-bit, "sdpa" without a mask,
           else "flex", except that a KV-cached step (Tq < Tk) under "flex" runs "sdpa": decoding meets a new Tk
           every token, and flex would rebuild its block mask and re-specialize its compiled kernel each time;
           CPU: "sdpa". ``resolve_backend`` applies this (and the fallbacks) for a model config.

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

Mask plans (per-mask preprocessing). A transformer calls ``attend`` from every layer with the same mask object, so
everything derived from a mask (the dense boolean mask, the FlexAttention BlockMask, the varlen segment plan) is
built once and kept in that mask's ``MaskPlan``. ``prepare(mask)`` returns it: plans are cached by the mask
object's identity (a weak reference; the entry goes when the mask is garbage collected, at most ``_PLAN_CACHE_SIZE``
entries), so ``attend(q, k, v, mask)`` from 24 layers builds each structure once. A plan rebuilds if the mask's
tensors are modified in place (their version counters change). Under ``torch.compile`` of a whole model, call
``prepare(mask)`` outside the compiled region and pass the plan as the mask (a traced ``attend`` given a raw mask
skips the cache and rebuilds on every call).
"""

from __future__ import annotations

import importlib
import math
import warnings
import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hermesflow_fast._notice import say_once
from hermesflow_fast.model.masks import OmniMask, as_dense_mask

__all__ = ["BACKENDS", "GroupPlan", "MaskPlan", "VarlenPlan", "attend", "eager_attention", "flash_available",
           "flex_available", "prepare", "resolve_backend", "split_attention",
           "varlen_attention"]

BACKENDS = ("auto", "sdpa", "flex", "flash", "eager")
_HALF = (torch.float16, torch.bfloat16)
SPLIT_MAX_WORK = 0.75  # "sdpa" splits an OmniMask by segment and branch when that scores <= 75% of the dense entries
_FLASH_INSTALL = "pip install flash-attn --no-build-isolation"


# ---------------------------------------------------------------------------------------------------------------
# dense reference


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> Tensor:
    """Dense reference: softmax(q kᵀ · scale + mask) v in fp32; mask (B, 1, Tq, Tk) bool or None."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# optional kernels


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_FLEX_COMPILED: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    """flex_attention, compiled once per process on CUDA (uncompiled it materializes the scores); plain on CPU."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention)
    return _FLEX_COMPILED


_FLASH: list = []  # [varlen fn or None], resolved on first use


def _load_flash_varlen() -> Callable | None:
    """The installed flash-attention varlen kernel wrapped to ``_varlen_reference``'s signature, or None. FA2
    (``flash_attn``) first, then FA4 (``flash_attn.cute``, package flash-attn-4). A package that is present but fails
    to import (built for another torch/CUDA) counts as missing; the error is said once."""
    if not _FLASH:
        fn = None
        for module, name in (("flash_attn", "flash-attn"), ("flash_attn.cute", "flash-attn-4")):
            try:
                kernel = importlib.import_module(module).flash_attn_varlen_func
            except (ModuleNotFoundError, AttributeError):  # flash-attn-4 alone has flash_attn/ without the FA2 API
                continue
            except Exception as e:  # an ABI mismatch raises ImportError/OSError/RuntimeError at import
                say_once(f"attn-{name}-broken", f"{name} is installed but does not import ({type(e).__name__}: {e})")
                continue
            fn = _wrap_flash(kernel, name)
            break
        _FLASH.append(fn)
    return _FLASH[0]


def flash_available() -> bool:
    return _load_flash_varlen() is not None


def _wrap_flash(kernel: Callable, name: str) -> Callable:
    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, softmax_scale=None):
        if q.dtype not in _HALF:
            raise ValueError(f"backend='flash' ({name}) needs bf16/fp16 q/k/v, got {q.dtype}; cast the model to "
                             "bf16, or use backend='flex' or 'sdpa' for fp32")
        if not q.is_cuda:
            raise ValueError(f"backend='flash' ({name}) needs CUDA tensors, got {q.device}")
        out = kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale=softmax_scale, causal=causal)
        return out[0] if isinstance(out, tuple) else out  # FA4 returns (out, lse)

    varlen.kernel_name = name
    return varlen


def _varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                      softmax_scale: float | None = None) -> Tensor:
    """FA2's ``flash_attn_varlen_func`` semantics in plain torch (fp32 math, differentiable; for tests and CPU).

    q (total_q, H, D), k/v (total_k, H, D) packed; segment i is q[cu_q[i]:cu_q[i+1]] over k[cu_k[i]:cu_k[i+1]].
    causal: bottom-right aligned, query m of n sees keys 0 … m + (L − n) of L; a query that sees no key outputs 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq)} entries but cu_seqlens_k has {len(ck)}")
    outs = []
    for i in range(len(cq) - 1):
        qs, ks, vs = q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
        n, L = qs.shape[0], ks.shape[0]
        if n > max_seqlen_q or L > max_seqlen_k:
            raise ValueError(f"segment {i} has {n} queries / {L} keys, above max_seqlen {max_seqlen_q}/{max_seqlen_k}")
        if n == 0:
            continue
        if L == 0:
            outs.append(qs.new_zeros(n, qs.shape[1], vs.shape[-1], dtype=torch.float32))
            continue
        s = torch.einsum("nhd,lhd->hnl", qs.float(), ks.float()) * scale
        if causal:
            see = torch.arange(L, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (L - n)
            empty = ~see.any(-1, keepdim=True)  # (n, 1): rows that see nothing (only when L < n)
            s = s.masked_fill(~see, float("-inf")).masked_fill(empty, 0.0)
            p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
        else:
            p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("hnl,lhd->nhd", p, vs.float()))
    if not outs:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    return torch.cat(outs).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# per-mask plans


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


def _rows(t: Tensor) -> Tensor:
    """(B, H, T, D) → (B·T, H, D): one row per token, what the split and varlen paths gather from."""
    B, H, T, D = t.shape
    return t.transpose(1, 2).reshape(B * T, H, D)


def _scatter_rows(outs: list[Tensor], rows: Tensor, q: Tensor, v: Tensor) -> Tensor:
    """The per-call outputs (rows, H, Dv), concatenated in ``rows`` order, back to (B, H, Tq, Dv); rows no call
    produced (pad queries) are 0."""
    B, H, Tq, _ = q.shape
    out = q.new_zeros(B * Tq, H, v.shape[-1])
    if outs:
        out = out.index_copy(0, rows, torch.cat(outs) if len(outs) > 1 else outs[0])
    return out.view(B, Tq, H, -1).transpose(1, 2)


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


def split_attention(q: Tensor, k: Tensor, v: Tensor, plan: GroupPlan, scale: float | None = None) -> Tensor:
    """SDPA once per group of ``plan`` on the gathered rows (no key outside a query's segment and branches is ever
    scored); pad query rows get 0, as on the flash path."""
    qf, kf, vf = _rows(q), _rows(k), _rows(v)
    outs = []
    for q_idx, k_idx, see in plan.groups:
        og = F.scaled_dot_product_attention(qf.index_select(0, q_idx).transpose(0, 1)[None],
                                            kf.index_select(0, k_idx).transpose(0, 1)[None],
                                            vf.index_select(0, k_idx).transpose(0, 1)[None], attn_mask=see, scale=scale)
        outs.append(og[0].transpose(0, 1))
    return _scatter_rows(outs, plan.q_rows, q, v)


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


# ---------------------------------------------------------------------------------------------------------------
# backends


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, mask: OmniMask | MaskPlan | None = None,
                     scale: float | None = None, varlen_fn: Callable | None = None) -> Tensor:
    """The flash path: ``mask`` decomposed into two varlen calls of ``varlen_fn`` (the installed flash-attention by
    default; ``_varlen_reference`` runs the same decomposition in plain torch). Pad query rows get 0."""
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    if varlen_fn is None:
        varlen_fn = _load_flash_varlen()
        if varlen_fn is None:
            raise RuntimeError(f"backend='flash' needs flash-attention: {_FLASH_INSTALL}")
    plan = prepare(mask) or MaskPlan(None)
    vp = plan.varlen(B, Tq, Tk, q.device)
    qf, kf, vf = _rows(q), _rows(k), _rows(v)
    outs = []
    for causal, q_idx, k_idx, cu_q, cu_k, max_q, max_k in vp.calls:
        outs.append(varlen_fn(qf.index_select(0, q_idx), kf.index_select(0, k_idx), vf.index_select(0, k_idx),
                              cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale))
    return _scatter_rows(outs, vp.q_rows, q, v)


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


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float | None) -> Tensor:
    fn = _flex_fn(q.device)
    if q.device.type == "cuda":
        return fn(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():  # the uncompiled CPU path is deliberate (see the module docstring)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return fn(q, k, v, block_mask=block_mask, scale=scale)


def _mask_of(mask):
    return mask.mask if isinstance(mask, MaskPlan) else mask


def resolve_backend(backend: str, device: torch.device | str, mask=None, dtype: torch.dtype | None = None) -> str:
    """The backend ``attend`` will run for ``backend`` (one of BACKENDS) on ``device`` with ``mask`` (OmniMask, bool
    tensor, MaskPlan or None) and, if known, the q/k/v ``dtype``: never "auto". A requested fast path that is missing
    falls back with a one-time FallbackWarning: "flash" without flash-attn → "flex" (CUDA) / "sdpa"; "flash" with a
    dense mask → "flex"; "flex"/"flash" without CUDA support → "sdpa"."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    cuda = torch.device(device).type == "cuda"
    m = _mask_of(mask)
    structured = m is None or isinstance(m, OmniMask)
    half = dtype is None or dtype in _HALF
    if backend == "auto":
        if not cuda or m is None:
            return "sdpa"  # no mask: SDPA picks its own flash kernel
        if structured and half and flash_available():
            return "flash"
        return "flex" if flex_available() else "sdpa"
    if backend == "flash":
        if not cuda:
            say_once("attn-flash-cpu", "attention backend 'flash' needs CUDA; using 'sdpa' on this device")
            return "sdpa"
        fallback = "flex" if flex_available() else "sdpa"
        if not flash_available():
            say_once("attn-flash-missing", f"attention backend 'flash': flash-attention is not installed "
                     f"({_FLASH_INSTALL}); using '{fallback}'")
            return fallback
        if not structured:
            say_once("attn-flash-dense", f"attention backend 'flash' needs an OmniMask, got a dense boolean mask; "
                     f"using '{fallback}'")
            return fallback
        return "flash"
    if backend == "flex" and not flex_available():
        say_once("attn-flex-missing", "attention backend 'flex': this torch has no FlexAttention; using 'sdpa'")
        return "sdpa"
    return backend


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: OmniMask | Tensor | MaskPlan | None = None, backend: str = "auto",
    scale: float | None = None,
) -> Tensor:
    """Attention of q (B, H, Tq, D) over k/v (B, H, Tk, D) under ``mask`` (see the module docstring)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, _ = q.shape
    Tk = k.shape[-2]
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or Tq > Tk:
        raise ValueError(f"k/v must be (B={B}, H={H}, Tk >= Tq={Tq}, D) like q, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    compiling = torch.compiler.is_compiling()
    if compiling and not isinstance(mask, MaskPlan):
        plan = None if mask is None else MaskPlan(mask, memo=False)  # no id()/weakref cache in a traced graph
    else:
        plan = prepare(mask)
    name = resolve_backend(backend, q.device, plan, q.dtype)
    if backend == "auto" and name == "flex" and Tq != Tk:
        # a KV-cached step (decoding: a new Tk every token) would build a block mask and re-specialize the compiled
        # flex kernel per step; its dense mask is only (B, Tq, Tk), so SDPA's masked kernel takes it
        name = "sdpa"
    if plan is not None:
        plan.check(B, Tq, Tk)
    if name == "flex" and q.device.type != "cuda":
        if compiling:  # inductor's CPU flex kernel gave wrong values in torch 2.13 (module docstring)
            name = "sdpa"
        elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            say_once("attn-flex-cpu-backward", "attention backend 'flex' has no backward on CPU (torch); using "
                     "'sdpa' where gradients are needed")
            name = "sdpa"
    if name == "flash":
        return varlen_attention(q, k, v, plan, scale)
    if name == "flex":
        return _flex(q, k, v, plan.block_mask(B, Tq, Tk, q.device) if plan is not None else None, scale)
    if name == "sdpa" and plan is not None and Tq == Tk and not compiling:
        groups = plan.groups(B, Tq, q.device)
        if groups is not None:
            return split_attention(q, k, v, groups, scale)
    dense = plan.dense(B, Tq, Tk, q.device) if plan is not None else None
    if name == "eager":
        return eager_attention(q, k, v, dense, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
