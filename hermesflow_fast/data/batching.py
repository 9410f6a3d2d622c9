"""From pairs to model input: tokenized pairs, their shared-prefix sequences, and token-budget packing of many pairs'
sequences into few rows.

A pair gives up to two sequences (model/layout.py, one row each):

    und   Layout.mmu_pair:  [mmu][soi] x [eoi] "USER: q ASSISTANT:" | y_w [eos] (branch 1) | y_l [eos] (branch 2)
    gen   Layout.t2i_pair:  [t2i][bos] y [eos] | [soi] x_w [eoi] (branch 1) | [soi] x_l [eoi] (branch 2)
          with the pair's one mask draw (data/gen_mask.py) on both images; with ``gen_masks`` = M > 1, M such
          branch pairs behind the one prompt, mask m on branches 2m+1 and 2m+2 (still one sequence, one forward)

Packing. Each sequence loses its padding (invalid tokens are never attended, and every kept token keeps its position
id, so nothing it computes changes), then sequences are placed into rows of at most ``token_budget`` tokens by first-fit
decreasing: sort by length (longest first, ties by input order), put each into the first row with room, else open a
row. In a row, sequences sit one after another in input order, told apart by the OmniMask ``segment`` tag (0, 1, …;
row padding: pad id, invalid, segment −1, position 0), so for every token

    packed attention(i, j) = unpacked attention(i, j) within its sequence, and nothing across sequences

and its hidden state, hence every log-prob, equals the unpacked one (tests/data/test_batching.py runs a model both
ways). The result, ``PackedBatch``, holds one target row per pair and per (side, branch):

    targets["und_chosen" | "und_rejected" | "gen_chosen" | "gen_rejected"] = Target(rows (P, L), labels (P, L))
    rows index the flattened (B·T) positions: hidden.flatten(0, 1)[rows] predicts labels (−100 = none); with
    several gen masks the gen targets' ``group`` (P, L) names each label's mask (−1 = none)

so ``logprob[p] = Σ_l log softmax(lm_head(h[rows[p, l]]))[labels[p, l]]`` is pair p's sequence log-prob for that
side, ready for a per-pair DPO margin (docs/differences.md). ``und_pairs`` / ``gen_pairs`` list the pairs that have
the side.

The bin packing runs as a numba ``@njit`` kernel (``_ffd_kernel``) when numba imports, else as its plain-Python twin
``first_fit_decreasing_py`` (said once); both give identical assignments. ``micro_batches`` splits a list of pairs
into packed batches of at most ``max_rows`` rows, a pair's sequences always in one batch.

    python -m pytest -q tests/data/test_batching.py
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hermesflow_fast._notice import say_once
from hermesflow_fast.data.gen_mask import FULL_RATIO, pair_generator, pair_masks
from hermesflow_fast.data.pairs import PairRecord
from hermesflow_fast.data.text import caption_ids, prompt_ids, und_prompt_ids
from hermesflow_fast.model.layout import IGNORE_INDEX, Layout, Sequences, Target
from hermesflow_fast.model.masks import OmniMask

__all__ = [
    "TARGET_KEYS",
    "PackedBatch",
    "TokenizedPair",
    "first_fit_decreasing",
    "first_fit_decreasing_py",
    "micro_batches",
    "pack",
    "pair_sequences",
    "text_budgets",
    "tokenize_pair",
]

TARGET_KEYS = ("und_chosen", "und_rejected", "gen_chosen", "gen_rejected")
SIDES = ("und", "gen")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenized pairs and their sequences
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizedPair:
    """A pair as ids. A side is present when both its fields are; None marks a dropped side."""

    id: str
    prompt_ids: list[int]
    und_prompt_ids: list[int]
    image_codes: Tensor | None  # (N,) codes of the real image (needed by the und side)
    caption_chosen_ids: list[int] | None
    caption_rejected_ids: list[int] | None
    image_chosen_codes: Tensor | None  # (N,)
    image_rejected_codes: Tensor | None  # (N,)
    truncated: int = 0  # texts cut to their budget by tokenize_pair

    def __post_init__(self) -> None:
        if (self.caption_chosen_ids is None) != (self.caption_rejected_ids is None):
            raise ValueError(f"pair {self.id!r}: give both captions or neither")
        if (self.image_chosen_codes is None) != (self.image_rejected_codes is None):
            raise ValueError(f"pair {self.id!r}: give both generated images or neither")
        if self.has_und and self.image_codes is None:
            raise ValueError(f"pair {self.id!r}: the understanding side needs the real image's codes")
        if self.has_gen and self.image_chosen_codes.shape != self.image_rejected_codes.shape:
            raise ValueError(f"pair {self.id!r}: image_chosen_codes {tuple(self.image_chosen_codes.shape)} and "
                             f"image_rejected_codes {tuple(self.image_rejected_codes.shape)} differ in shape")

    @property
    def has_und(self) -> bool:
        return self.caption_chosen_ids is not None

    @property
    def has_gen(self) -> bool:
        return self.image_chosen_codes is not None


def text_budgets(layout: Layout, und_prompt_len: int) -> tuple[int, int]:
    """(caption budget, prompt budget) in tokens so the layout cuts nothing: a caption + eos after a prompt of
    ``und_prompt_len`` tokens fills at most ``mmu_text_len``; ``[t2i][bos] prompt [eos]`` at most ``t2i_text_len``."""
    return layout.mmu_text_len - und_prompt_len - 1, layout.t2i_text_len - 3


def tokenize_pair(record: PairRecord, text_tokenizer: Any, codes: Callable[[str], Tensor], *,
                  caption_budget: int | None = None, prompt_budget: int | None = None) -> TokenizedPair:
    """A validated record as ids (data/text.py's templates); ``codes(ref)`` -> (N,) codes of an image ref (e.g.
    ``ImageCodes``). Captions over ``caption_budget`` and a prompt over ``prompt_budget`` are cut and counted."""
    if record.id is None or record.prompt is None:
        raise ValueError(f"tokenize_pair: record on line {record.line} lacks an id or a prompt; validate it first")
    cut = 0

    def fit(ids: list[int], budget: int | None) -> list[int]:
        nonlocal cut
        if budget is not None and len(ids) > budget:
            cut += 1
            return ids[:budget]
        return ids

    und = record.caption_chosen is not None and record.caption_rejected is not None
    gen = record.image_chosen is not None and record.image_rejected is not None
    return TokenizedPair(
        id=record.id,
        prompt_ids=fit(prompt_ids(text_tokenizer, record.prompt), prompt_budget),
        und_prompt_ids=und_prompt_ids(text_tokenizer, record.question_text),
        image_codes=codes(record.image) if und else None,
        caption_chosen_ids=fit(caption_ids(text_tokenizer, record.caption_chosen), caption_budget) if und else None,
        caption_rejected_ids=fit(caption_ids(text_tokenizer, record.caption_rejected), caption_budget) if und else None,
        image_chosen_codes=codes(record.image_chosen) if gen else None,
        image_rejected_codes=codes(record.image_rejected) if gen else None,
        truncated=cut,
    )


def pair_sequences(layout: Layout, pair: TokenizedPair, epoch: int, seed: int, gen_masks: int = 1,
                   gen_mask_ratio: Sequence[float] = FULL_RATIO) -> dict[str, Sequences]:
    """{"und": Layout.mmu_pair row, "gen": Layout.t2i_pair row with ``pair_mask(pair.id, epoch, seed, N)``}, a key
    only for a side the pair has. Each Sequences is one row with targets "chosen" and "rejected". ``gen_masks`` > 1:
    the gen row holds masks 0 … gen_masks−1 (``pair_masks``) as branch pairs, its targets grouped by mask;
    ``gen_mask_ratio``: (min, max) of every mask's ratio."""
    out: dict[str, Sequences] = {}
    if pair.has_und:
        out["und"] = layout.mmu_pair(pair.image_codes[None], [pair.und_prompt_ids], [pair.caption_chosen_ids],
                                     [pair.caption_rejected_ids])
    if pair.has_gen:
        n = pair.image_chosen_codes.numel()
        masks = pair_masks(pair.id, epoch, seed, n, gen_masks, gen_mask_ratio)  # (M, N)
        masked = masks[None] if gen_masks > 1 else masks  # (1, M, N) or (1, N)
        out["gen"] = layout.t2i_pair([pair.prompt_ids], pair.image_chosen_codes[None],
                                     pair.image_rejected_codes[None], masked)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# First-fit decreasing
# ---------------------------------------------------------------------------------------------------------------------


def first_fit_decreasing_py(lengths: Sequence[int], capacity: int) -> list[int]:
    """Bin of each item: items longest first (ties: lower index first) into the first bin with room; bins numbered
    in opening order. The plain-Python twin of ``_ffd_kernel`` (and its fallback)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room: list[int] = []
    out = [0] * len(lengths)
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                room[b] -= lengths[i]
                out[i] = b
                break
        else:
            room.append(capacity - lengths[i])
            out[i] = len(room) - 1
    return out


def _ffd_kernel(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """``first_fit_decreasing_py`` on an int64 array, in numba's subset (compiled by ``_compiled``)."""
    n = lengths.shape[0]
    order = np.argsort(-lengths, kind="mergesort")  # stable: ties keep index order
    room = np.empty(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    bins = 0
    for j in range(n):
        i = order[j]
        length = lengths[i]
        placed = False
        for b in range(bins):
            if length <= room[b]:
                room[b] -= length
                out[i] = b
                placed = True
                break
        if not placed:
            room[bins] = capacity - length
            out[i] = bins
            bins += 1
    return out


_kernel: Callable | None | bool = None


def _compiled() -> Callable | None:
    """The njit-compiled kernel, or None (numba missing: said once)."""
    global _kernel
    if _kernel is None:
        try:
            import numba
        except ImportError:
            say_once("batching-numba", "numba is not installed: sequence packing runs first-fit decreasing in plain "
                                       "Python (slower for many pairs); pip install numba for the compiled kernel")
            _kernel = False
        else:
            _kernel = numba.njit(cache=True, nogil=True)(_ffd_kernel)
    return _kernel or None


def first_fit_decreasing(lengths: np.ndarray | Sequence[int], capacity: int) -> np.ndarray:
    """(n,) int64 bin of each item (see ``first_fit_decreasing_py``). ValueError if an item exceeds ``capacity``."""
    arr = np.ascontiguousarray(lengths, dtype=np.int64)  # (n,)
    if arr.ndim != 1:
        raise ValueError(f"first_fit_decreasing: lengths must be 1-D, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > capacity):
        i = int(np.argmax(arr > capacity)) if int(arr.max()) > capacity else int(np.argmin(arr))
        raise ValueError(f"first_fit_decreasing: item {i} has length {int(arr[i])}, outside [0, capacity "
                         f"{capacity}]")
    kernel = _compiled()
    if kernel is None:
        return np.asarray(first_fit_decreasing_py(arr.tolist(), capacity), dtype=np.int64)
    return kernel(arr, np.int64(capacity))


# ---------------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """Several pairs' sequences in B rows of T tokens; see the module docstring."""

    input_ids: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    mask: OmniMask  # (B, T) tags with segment
    targets: dict[str, Target]  # TARGET_KEYS -> rows (P, L) into B·T, labels (P, L)
    pair_ids: list[str]  # (P,)
    und_pairs: list[int]  # indices into pair_ids of the pairs with an und side
    gen_pairs: list[int]  # … with a gen side
    truncated: int = 0  # texts the layout cut
    row_lengths: list[int] = field(default_factory=list)  # tokens of each row (before row padding)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.valid.sum())

    @property
    def fill(self) -> float:
        """Share of the B·T slots holding a real token."""
        return self.num_tokens / max(1, self.input_ids.numel())

    def to(self, device: torch.device | str) -> PackedBatch:
        t = {k: v.to(device) for k, v in self.targets.items()}
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.mask.to(device), t,
                           list(self.pair_ids), list(self.und_pairs), list(self.gen_pairs), self.truncated,
                           list(self.row_lengths))


@dataclass
class _Piece:
    """One sequence without its padding."""

    pair: int
    side: str
    ids: Tensor  # (L,)
    pos: Tensor  # (L,)
    block: Tensor  # (L,)
    branch: Tensor  # (L,)
    targets: dict[str, tuple[Tensor, Tensor, Tensor | None]]  # "chosen"/"rejected" -> rows (n,) into the piece,
    # labels (n,), mask index (n,) or None


def _strip(seq: Sequences, pair: int, side: str, pair_id: str) -> _Piece:
    if seq.input_ids.shape[0] != 1 or seq.mask.segment is not None:
        raise ValueError(f"pack: pair {pair_id!r} {side}: expected one unpacked row, got input_ids "
                         f"{tuple(seq.input_ids.shape)}{' with segments' if seq.mask.segment is not None else ''}")
    keep = seq.mask.valid[0]  # (T,)
    new = torch.cumsum(keep.long(), 0) - 1  # (T,) new index of each kept token
    targets = {}
    for name, t in seq.targets.items():
        sel = t.labels[0] != IGNORE_INDEX
        rows = t.rows[0][sel]
        if not bool(keep[rows].all()):
            raise ValueError(f"pack: pair {pair_id!r} {side} target {name!r} reads a padding position")
        targets[name] = (new[rows], t.labels[0][sel], None if t.group is None else t.group[0][sel])
    m = seq.mask
    return _Piece(pair, side, seq.input_ids[0][keep], seq.position_ids[0][keep], m.block[0][keep],
                  m.branch[0][keep], targets)


def pack(pair_ids: Sequence[str], sequences: Sequence[dict[str, Sequences]], token_budget: int,
         pad_id: int = 0) -> PackedBatch:
    """Pack the pairs' sequences (``pair_sequences`` output, one dict per pair) into rows of ≤ ``token_budget``
    tokens. ``pad_id``: the id row padding carries (never attended; micro_batches passes vocab.pad). ValueError
    naming the pair, side and lengths if one sequence alone exceeds the budget."""
    if len(pair_ids) != len(sequences):
        raise ValueError(f"pack: {len(pair_ids)} pair ids for {len(sequences)} sequence dicts")
    if token_budget < 1:
        raise ValueError(f"pack: token_budget must be ≥ 1, got {token_budget}")
    pieces: list[_Piece] = []
    truncated = 0
    for p, d in enumerate(sequences):
        unknown = set(d) - set(SIDES)
        if unknown:
            raise ValueError(f"pack: pair {pair_ids[p]!r} has sequences {sorted(unknown)}; expected 'und', 'gen'")
        for side in SIDES:
            if side in d:
                seq = d[side]
                truncated += seq.truncated
                pieces.append(_strip(seq, p, side, pair_ids[p]))
    lengths = [len(pc.ids) for pc in pieces]
    for pc, n in zip(pieces, lengths):
        if n > token_budget:
            others = ", ".join(f"{q.side} {len(q.ids)}" for q in pieces if q.pair == pc.pair)
            raise ValueError(f"pack: pair {pair_ids[pc.pair]!r}: its {pc.side} sequence has {n} tokens, over the "
                             f"token budget {token_budget} (its sequences: {others}); raise token_budget to ≥ {n}")
    bins = first_fit_decreasing(lengths, token_budget).tolist() if pieces else []
    B = max(bins, default=-1) + 1
    fill = [0] * B
    starts = []
    for pc, b in zip(pieces, bins):
        starts.append(fill[b])
        fill[b] += len(pc.ids)
    T = max(fill, default=0)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    block = torch.full((B, T), -1, dtype=torch.int32)
    branch = torch.zeros(B, T, dtype=torch.int32)
    segment = torch.full((B, T), -1, dtype=torch.int32)
    seg_count = [0] * B
    per_key: dict[str, dict[int, tuple[Tensor, Tensor, Tensor | None]]] = {k: {} for k in TARGET_KEYS}
    for pc, b, s in zip(pieces, bins, starts):
        e = s + len(pc.ids)
        ids[b, s:e], pos[b, s:e], valid[b, s:e] = pc.ids, pc.pos, True
        block[b, s:e], branch[b, s:e] = pc.block, pc.branch
        segment[b, s:e] = seg_count[b]
        seg_count[b] += 1
        for name, (rows, labels, group) in pc.targets.items():
            per_key[f"{pc.side}_{name}"][pc.pair] = (rows + (b * T + s), labels, group)
    P = len(pair_ids)
    targets = {}
    for key, got in per_key.items():
        L = max((len(r) for r, _, _ in got.values()), default=0)
        rows = torch.zeros(P, L, dtype=torch.long)  # (P, L)
        labels = torch.full((P, L), IGNORE_INDEX, dtype=torch.long)  # (P, L)
        grouped = any(g is not None for _, _, g in got.values())
        group = torch.full((P, L), -1, dtype=torch.long) if grouped else None  # (P, L) mask of each label
        for p, (r, y, g) in got.items():
            rows[p, : len(r)], labels[p, : len(y)] = r, y
            if group is not None:
                group[p, : len(y)] = 0 if g is None else g
        targets[key] = Target(rows, labels, group)
    und = sorted({pc.pair for pc in pieces if pc.side == "und"})
    gen = sorted({pc.pair for pc in pieces if pc.side == "gen"})
    return PackedBatch(ids, pos, OmniMask(valid, block, branch, segment), targets, list(pair_ids), und, gen,
                       truncated, fill)


def _stripped_length(seq: Sequences) -> int:
    return int(seq.mask.valid[0].sum())


def micro_batches(pairs: Sequence[TokenizedPair], layout: Layout, token_budget: int, epoch: int, seed: int, *,
                  max_rows: int = 1, shuffle: bool = True, gen_masks: int = 1,
                  gen_mask_ratio: Sequence[float] = FULL_RATIO) -> list[PackedBatch]:
    """Split ``pairs`` into packed batches of at most ``max_rows`` rows of ≤ ``token_budget`` tokens each.

    Order: ``shuffle`` sorts the pairs by id and permutes them with a generator seeded by (epoch, seed), so the
    batches depend on the set of pairs, the epoch and the seed only; ``shuffle=False`` keeps the given order. Pairs
    are then taken greedily: a pair joins the current batch if first-fit decreasing still packs the batch's
    sequences into ``max_rows`` rows, else it starts the next one. A pair's sequences are always in one batch.
    ``gen_masks``, ``gen_mask_ratio``: the gen side's masks per pair and their ratio bounds (``pair_sequences``).
    ValueError if one pair alone needs more than ``max_rows`` rows, naming it and its lengths.
    """
    if max_rows < 1:
        raise ValueError(f"micro_batches: max_rows must be ≥ 1, got {max_rows}")
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"micro_batches: pair id {dup!r} appears more than once")
    order = list(range(len(pairs)))
    if shuffle:
        order.sort(key=lambda i: ids[i])
        perm = torch.randperm(len(order), generator=pair_generator("", epoch, seed, "batch-order")).tolist()
        order = [order[j] for j in perm]
    seqs = {i: pair_sequences(layout, pairs[i], epoch, seed, gen_masks, gen_mask_ratio) for i in order}
    lens = {i: [_stripped_length(s) for s in seqs[i].values()] for i in order}

    def rows(lengths: list[int]) -> int:
        return int(first_fit_decreasing(lengths, token_budget).max(initial=-1)) + 1

    groups: list[list[int]] = []
    current: list[int] = []
    current_lens: list[int] = []
    for i in order:
        desc = ", ".join(f"{s} {n}" for s, n in zip(seqs[i], lens[i]))
        over = [(side, n) for side, n in zip(seqs[i], lens[i]) if n > token_budget]
        if over:
            why = f"; gen_masks={gen_masks} puts {gen_masks} masked copies of each image in it" if gen_masks > 1 \
                and over[0][0] == "gen" else ""
            raise ValueError(f"micro_batches: pair {ids[i]!r} has a {over[0][0]} sequence of {over[0][1]} tokens, "
                             f"over the token budget {token_budget} (its sequences: {desc}){why}")
        if rows(lens[i]) > max_rows:
            raise ValueError(f"micro_batches: pair {ids[i]!r} needs more than max_rows={max_rows} row(s) of "
                             f"{token_budget} tokens (its sequences: {desc}); raise token_budget to ≥ "
                             f"{sum(lens[i])} or max_rows")
        trial = current_lens + lens[i]
        if current and rows(trial) > max_rows:
            groups.append(current)
            current, trial = [], list(lens[i])
        current.append(i)
        current_lens = trial
    if current:
        groups.append(current)
    return [pack([ids[i] for i in g], [seqs[i] for i in g], token_budget, pad_id=layout.vocab.pad) for g in groups]
