"""Show-o's token layout: the vocabulary, the t2i / mmu sequences with labels and omni-attention masks, and the
shared-prefix packed layouts of a preference pair. The one place that knows token ids.

Vocabulary (all ids from a tokenizer or a config; Show-o's order):

    [0, text_vocab_size)             text tokens; eos (= bos = <|sot|> = <|eot|> in phi-1.5) among them
    pad, soi, eoi, sov, eov, t2i, mmu, t2v, v2v, lvg      special tokens appended after the text vocabulary
    [image_offset, +num_image_codes) image codes            image_offset = text_vocab_size + number of specials
    mask                              the [MASK] image token, last id; vocab_size = mask + 1

Sequences (B rows, one layout per call; ``Sequences`` holds ids, positions, mask tags and named targets):

    t2i   [pad…][t2i][bos] text [eos] | [soi] image(N) [eoi]       text part left-padded to ``text_len`` (129)
          text causal, [soi]…[eoi] one bidirectional block that sees all text, pads never seen;
          target "image": rows = the masked image slots themselves (no shift), labels = the true codes' ids
    mmu   [mmu][soi] image(N) [eoi] | prompt answer [eos] [pad…]     text part right-padded to ``text_len`` (128)
          the image prefix one bidirectional block, text causal; target "answer": next-token rows (row t−1
          predicts token t) over answer + eos
    packed pair (one copy of the prefix, then chosen = branch 1, rejected = branch 2; each sees the prefix and
          itself only; position ids restart after the prefix so each branch sits where it would unpacked):
      t2i: text prefix | [soi] x_w [eoi] | [soi] x_l [eoi]            targets "chosen"/"rejected": masked slots,
                                                                       one set of masked positions for both; with
           M masks, M such (chosen, rejected) branch pairs behind the one prefix, and the targets' ``group`` names
           the mask of each label
      mmu: [mmu][soi] image [eoi] prompt | y_w [eos] | y_l [eos]       targets: next-token rows; the first token of
                                                                       each branch is predicted by the last prefix row
A target is (rows (B, L) int64 into the T positions, labels (B, L) int64 with −100 = none): the trainer gathers the
hidden states at ``rows`` and runs the fused log-prob head against ``labels``.

    python -m pytest -q tests/model/test_layout.py
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hermesflow_fast.model.masks import OmniMask

__all__ = ["IGNORE_INDEX", "SPECIAL_TOKENS", "Layout", "Sequences", "Target", "Vocabulary"]

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")
PAD_TOKEN = "[PAD]"


@dataclass(frozen=True)
class Vocabulary:
    """Token ids of one unified model; build with ``from_tokenizer``, ``show_o`` or ``from_dict``."""

    text_vocab_size: int
    bos: int
    eos: int
    pad: int
    special: dict[str, int]  # the SPECIAL_TOKENS names → ids
    image_offset: int
    num_image_codes: int

    def __post_init__(self) -> None:
        missing = [s for s in ("<|soi|>", "<|eoi|>", "<|t2i|>", "<|mmu|>") if s not in self.special]
        if missing:
            raise ValueError(f"Vocabulary: special tokens {missing} have no id")
        ids = [self.pad, *self.special.values()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Vocabulary: special token ids collide: pad={self.pad}, {self.special}")
        if any(lo <= i < lo + self.num_image_codes for i in ids for lo in (self.image_offset,)):
            raise ValueError("Vocabulary: a special token id falls inside the image-code range")

    # ids the layouts use
    @property
    def soi(self) -> int:
        return self.special["<|soi|>"]

    @property
    def eoi(self) -> int:
        return self.special["<|eoi|>"]

    @property
    def t2i(self) -> int:
        return self.special["<|t2i|>"]

    @property
    def mmu(self) -> int:
        return self.special["<|mmu|>"]

    @property
    def mask(self) -> int:
        return self.image_offset + self.num_image_codes

    @property
    def vocab_size(self) -> int:
        return self.mask + 1

    @classmethod
    def build(cls, text_vocab_size: int, eos: int, num_image_codes: int, bos: int | None = None) -> Vocabulary:
        """Show-o's order: [PAD] then the 9 specials right after the text vocabulary, then codes, then [MASK]."""
        special = {name: text_vocab_size + 1 + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(text_vocab_size, eos if bos is None else bos, eos, text_vocab_size, special,
                   text_vocab_size + 1 + len(SPECIAL_TOKENS), num_image_codes)

    @classmethod
    def show_o(cls, text_vocab_size: int = 50295, eos: int = 50256, num_image_codes: int = 8192) -> Vocabulary:
        """Show-o with the phi-1.5 tokenizer (llm_vocab_size 50295, <|endoftext|> 50256, 8192 MAGVIT-v2 codes)."""
        return cls.build(text_vocab_size, eos, num_image_codes)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, num_image_codes: int) -> Vocabulary:
        """From a HF tokenizer: adds ``[PAD]`` and the specials if absent (as Show-o does), ids by lookup."""
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        have = set(tokenizer.get_vocab())
        new = [s for s in SPECIAL_TOKENS if s not in have]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new})
        special = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        if eos is None:
            raise ValueError("tokenizer has no eos token; the layouts end text with eos")
        return cls(len(tokenizer) - len(special) - 1, bos, eos, tokenizer.pad_token_id, special, len(tokenizer),
                   num_image_codes)

    def to_dict(self) -> dict[str, Any]:
        return {"text_vocab_size": self.text_vocab_size, "bos": self.bos, "eos": self.eos, "pad": self.pad,
                "special": dict(self.special), "image_offset": self.image_offset,
                "num_image_codes": self.num_image_codes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        return cls(**{**d, "special": dict(d["special"])})

    # code ↔ id
    def image_ids(self, codes: Tensor) -> Tensor:
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_image_codes):
            raise ValueError(f"image codes span [{int(codes.min())}, {int(codes.max())}], outside "
                             f"[0, {self.num_image_codes})")
        return codes.long() + self.image_offset

    def codes(self, ids: Tensor) -> Tensor:
        return ids.long() - self.image_offset

    def check_text(self, ids: Sequence[int], where: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.text_vocab_size]
        if bad:
            raise ValueError(f"{where}: text ids {bad[:5]} are outside the text vocabulary [0, {self.text_vocab_size})")


@dataclass
class Target:
    rows: Tensor  # (B, L) int64: positions whose hidden state predicts the label
    labels: Tensor  # (B, L) int64: vocabulary ids, IGNORE_INDEX where there is none
    group: Tensor | None = None  # (B, L) int64: which of a row's masks scores the label (0…M−1); None = one mask

    def to(self, device) -> Target:
        return Target(self.rows.to(device), self.labels.to(device),
                      None if self.group is None else self.group.to(device))


@dataclass
class Sequences:
    input_ids: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    mask: OmniMask
    targets: dict[str, Target] = field(default_factory=dict)
    truncated: int = 0  # rows whose text was cut to fit text_len

    def to(self, device) -> Sequences:
        t = {k: v.to(device) for k, v in self.targets.items()}
        return Sequences(self.input_ids.to(device), self.position_ids.to(device), self.mask.to(device), t,
                         self.truncated)


# -- helpers ----------------------------------------------------------------------------------------------------------
class _Rows:
    """Accumulates one row's tokens with their tags."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.valid: list[bool] = []
        self.block: list[int] = []
        self.branch: list[int] = []

    def add(self, ids: Sequence[int], *, valid=True, block=-1, branch=0, pos0: int | None = None) -> int:
        start = len(self.ids)
        p0 = len(self.ids) if pos0 is None else pos0
        self.ids += list(ids)
        self.pos += range(p0, p0 + len(ids))
        self.valid += [valid] * len(ids)
        self.block += [block] * len(ids)
        self.branch += [branch] * len(ids)
        return start


def _stack(rows: list[_Rows], pad: int) -> tuple[Tensor, Tensor, OmniMask]:
    T = max(len(r.ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    block = torch.full((B, T), -1, dtype=torch.int32)
    branch = torch.zeros(B, T, dtype=torch.int32)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n] = torch.tensor(r.ids, dtype=torch.long)
        pos[b, :n] = torch.tensor(r.pos, dtype=torch.long)
        if n < T:  # right padding to the batch width continues the positions
            pos[b, n:] = torch.arange(r.pos[-1] + 1 if n else 0, r.pos[-1] + 1 + T - n if n else T - n)
        valid[b, :n] = torch.tensor(r.valid)
        block[b, :n] = torch.tensor(r.block, dtype=torch.int32)
        branch[b, :n] = torch.tensor(r.branch, dtype=torch.int32)
    return ids, pos, OmniMask(valid, block, branch)


def _targets(per_row: list[tuple[list[int], list[int]]], groups: list[list[int]] | None = None) -> Target:
    L = max((len(r) for r, _ in per_row), default=0)
    rows = torch.zeros(len(per_row), L, dtype=torch.long)
    labels = torch.full((len(per_row), L), IGNORE_INDEX, dtype=torch.long)
    group = None if groups is None else torch.full((len(per_row), L), -1, dtype=torch.long)
    for b, (r, y) in enumerate(per_row):
        rows[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        labels[b, : len(y)] = torch.tensor(y, dtype=torch.long)
        if group is not None:
            group[b, : len(y)] = torch.tensor(groups[b], dtype=torch.long)
    return Target(rows, labels, group)


def _as_list_rows(x: Sequence[Sequence[int]] | Tensor, name: str) -> list[list[int]]:
    if isinstance(x, Tensor):
        if x.dim() != 2:
            raise ValueError(f"{name} must be (B, L), got shape {tuple(x.shape)}")
        return x.tolist()
    return [list(map(int, r)) for r in x]


def _check_grid(vocab: Vocabulary, codes: Tensor, name: str) -> Tensor:
    if not isinstance(codes, Tensor) or codes.dim() != 2:
        raise ValueError(f"{name} must be a (B, N) tensor of image codes, got "
                         f"{tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__}")
    return vocab.image_ids(codes)


class Layout:
    """Builds Show-o's sequences for one vocabulary. ``t2i_text_len`` = 129 and ``mmu_text_len`` = 128 in Show-o."""

    def __init__(self, vocab: Vocabulary, t2i_text_len: int = 129, mmu_text_len: int = 128):
        if t2i_text_len < 3:
            raise ValueError(f"t2i_text_len {t2i_text_len} leaves no room for [t2i][bos]…[eos]")
        self.vocab, self.t2i_text_len, self.mmu_text_len = vocab, t2i_text_len, mmu_text_len

    # -- t2i --------------------------------------------------------------------------------------------------------
    def t2i_text(self, text: Sequence[int]) -> tuple[list[int], bool]:
        """``[pad…][t2i][bos] text [eos]`` of exactly ``t2i_text_len`` tokens; long text cut (→ True)."""
        v, L = self.vocab, self.t2i_text_len
        v.check_text(text, "t2i text")
        body = [v.t2i, v.bos, *text, v.eos]
        cut = len(body) > L
        if cut:
            body = body[: L - 1] + [v.eos]
        return [v.pad] * (L - len(body)) + body, cut

    def _t2i_prefix(self, row: _Rows, text: Sequence[int]) -> bool:
        ids, cut = self.t2i_text(text)
        n_pad = ids.index(self.vocab.t2i)  # left padding
        row.add(ids[:n_pad], valid=False)
        row.add(ids[n_pad:])
        return cut

    def _image_block(self, row: _Rows, image_ids: list[int], block: int, branch: int, pos0: int | None) -> int:
        v = self.vocab
        start = row.add([v.soi, *image_ids, v.eoi], block=block, branch=branch, pos0=pos0)
        return start + 1  # first image slot

    def t2i(self, texts: Sequence[Sequence[int]], codes: Tensor | None = None, masked: Tensor | None = None
            ) -> Sequences:
        """t2i rows. ``codes`` (B, N) true codes (None: generation, all slots [MASK]); ``masked`` (B, N) bool: slots
        replaced by [MASK] and scored (target "image"); None with codes = nothing masked."""
        v = self.vocab
        texts = _as_list_rows(texts, "texts")
        if codes is None:
            raise ValueError("t2i needs codes (B, N); for generation pass torch.zeros(B, N) and masked=all True")
        img = _check_grid(v, codes, "codes")
        B, N = img.shape
        if len(texts) != B:
            raise ValueError(f"t2i: {len(texts)} texts for {B} image grids")
        if masked is None:
            masked = torch.zeros(B, N, dtype=torch.bool)
        if masked.shape != (B, N):
            raise ValueError(f"masked has shape {tuple(masked.shape)}, expected {(B, N)} like codes")
        rows, tgts, cut = [], [], 0
        for b in range(B):
            r = _Rows()
            cut += self._t2i_prefix(r, texts[b])
            slot0 = self._image_block(r, torch.where(masked[b], v.mask, img[b]).tolist(), 0, 0, None)
            m = masked[b].nonzero().flatten().tolist()
            tgts.append(([slot0 + i for i in m], [int(img[b, i]) for i in m]))
            rows.append(r)
        ids, pos, mask = _stack(rows, v.pad)
        return Sequences(ids, pos, mask, {"image": _targets(tgts)}, cut)

    # -- mmu --------------------------------------------------------------------------------------------------------
    def _mmu_prefix(self, row: _Rows, image_ids: list[int]) -> None:
        v = self.vocab
        row.add([v.mmu, v.soi, *image_ids, v.eoi], block=0)

    def mmu(self, codes: Tensor, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]] | None = None,
            sot: bool = False, pad_to: bool = True) -> Sequences:
        """``[mmu][soi] image [eoi] ([sot]) prompt answer [eos]``; target "answer" (next-token) over answer + eos.

        ``answers=None`` builds a generation prompt (no eos, no target; ``sot=True`` is Show-o's inference form),
        right-padded; ``pad_to`` pads the text part to ``mmu_text_len`` (training) instead of the batch width.
        """
        v = self.vocab
        img = _check_grid(v, codes, "codes")
        prompts = _as_list_rows(prompts, "prompts")
        B = img.shape[0]
        if len(prompts) != B or (answers is not None and len(answers) != B):
            raise ValueError(f"mmu: {B} images, {len(prompts)} prompts, "
                             f"{'no' if answers is None else len(answers)} answers")
        rows, tgts, cut = [], [], 0
        for b in range(B):
            r = _Rows()
            self._mmu_prefix(r, img[b].tolist())
            text = ([v.bos] if sot else []) + list(prompts[b])
            v.check_text(prompts[b], f"mmu prompt {b}")
            start = len(r.ids)
            if answers is not None:
                v.check_text(answers[b], f"mmu answer {b}")
                ans = [*answers[b], v.eos]
                text_all = text + ans
                if pad_to and len(text_all) > self.mmu_text_len:
                    text_all, cut = text_all[: self.mmu_text_len], cut + 1
                r.add(text_all)
                first = start + len(text)
                n = len(r.ids) - first
                tgts.append((list(range(first - 1, first - 1 + n)), r.ids[first:first + n]))
            else:
                r.add(text)
            if pad_to and answers is not None and len(r.ids) - start < self.mmu_text_len:
                r.add([v.pad] * (self.mmu_text_len - (len(r.ids) - start)), valid=False)
            rows.append(r)
        ids, pos, mask = _stack(rows, v.pad)
        targets = {"answer": _targets(tgts)} if answers is not None else {}
        return Sequences(ids, pos, mask, targets, cut)

    # -- shared-prefix packed pairs ---------------------------------------------------------------------------------
    def t2i_pair(self, texts: Sequence[Sequence[int]], chosen: Tensor, rejected: Tensor, masked: Tensor
                 ) -> Sequences:
        """Prompt once, then ``[soi] x_w [eoi]`` (branch 1) and ``[soi] x_l [eoi]`` (branch 2), both at the
        positions they have unpacked; ``masked`` (B, N) is shared by both (the pair's one mask draw).

        ``masked`` (B, M, N): M masks per row, each a chosen and a rejected branch (2m + 1, 2m + 2 for mask m) behind
        the one prompt, each exactly the unpacked single-mask row; the targets then list mask 0's slots, then mask
        1's, … and carry ``group`` = the mask of each label."""
        v = self.vocab
        texts = _as_list_rows(texts, "texts")
        cw, cl = _check_grid(v, chosen, "chosen"), _check_grid(v, rejected, "rejected")
        several = masked.dim() == 3
        masks = masked if several else masked.unsqueeze(1)  # (B, M, N)
        if cw.shape != cl.shape or masks.shape[0] != cw.shape[0] or masks.shape[2:] != cw.shape[1:] \
                or len(texts) != cw.shape[0] or masks.shape[1] < 1:
            raise ValueError(f"t2i_pair: chosen {tuple(cw.shape)}, rejected {tuple(cl.shape)}, masked "
                             f"{tuple(masked.shape)} and {len(texts)} texts must agree")
        rows, tw, tl, groups, cut = [], [], [], [], 0
        for b in range(cw.shape[0]):
            r = _Rows()
            cut += self._t2i_prefix(r, texts[b])
            p0 = len(r.ids)
            rw, yw, rl, yl, gb = [], [], [], [], []
            for m, mask in enumerate(masks[b]):
                slots = mask.nonzero().flatten().tolist()
                sw = self._image_block(r, torch.where(mask, v.mask, cw[b]).tolist(), 2 * m + 1, 2 * m + 1, p0)
                sl = self._image_block(r, torch.where(mask, v.mask, cl[b]).tolist(), 2 * m + 2, 2 * m + 2, p0)
                rw += [sw + i for i in slots]
                yw += [int(cw[b, i]) for i in slots]
                rl += [sl + i for i in slots]
                yl += [int(cl[b, i]) for i in slots]
                gb += [m] * len(slots)
            tw.append((rw, yw))
            tl.append((rl, yl))
            groups.append(gb)
            rows.append(r)
        ids, pos, mask = _stack(rows, v.pad)
        g = groups if several else None
        return Sequences(ids, pos, mask, {"chosen": _targets(tw, g), "rejected": _targets(tl, g)}, cut)

    def mmu_pair(self, codes: Tensor, prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                 rejected: Sequence[Sequence[int]]) -> Sequences:
        """``[mmu][soi] image [eoi] prompt`` once, then ``y_w [eos]`` (branch 1) and ``y_l [eos]`` (branch 2).

        Each answer is cut so prompt + answer + eos fits ``mmu_text_len`` as it would unpacked."""
        v = self.vocab
        img = _check_grid(v, codes, "codes")
        prompts = _as_list_rows(prompts, "prompts")
        B = img.shape[0]
        if not len(prompts) == len(chosen) == len(rejected) == B:
            raise ValueError(f"mmu_pair: {B} images, {len(prompts)} prompts, {len(chosen)} chosen, "
                             f"{len(rejected)} rejected")
        rows, tw, tl, cut = [], [], [], 0
        for b in range(B):
            r = _Rows()
            self._mmu_prefix(r, img[b].tolist())
            v.check_text(prompts[b], f"mmu_pair prompt {b}")
            r.add(prompts[b])
            last, p0 = len(r.ids) - 1, len(r.ids)
            room = self.mmu_text_len - len(prompts[b])
            for branch, ans, tg in ((1, chosen[b], tw), (2, rejected[b], tl)):
                v.check_text(ans, f"mmu_pair {'chosen' if branch == 1 else 'rejected'} {b}")
                y = [*ans, v.eos]
                if len(y) > room:
                    y, cut = y[:room], cut + 1
                s = r.add(y, branch=branch, pos0=p0)
                tg.append(([last] + list(range(s, s + len(y) - 1)), y))
            rows.append(r)
        ids, pos, mask = _stack(rows, v.pad)
        return Sequences(ids, pos, mask, {"chosen": _targets(tw), "rejected": _targets(tl)}, cut)
