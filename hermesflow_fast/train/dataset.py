"""The pairs a run trains on: read + validate + tokenize (real data), or a seeded synthetic set (the tiny recipe).

    real:       data.pairs (JSONL or HermesFlow's pair_dpo_data.json) → validate (report printed, strict or skip)
                → text ids (data.text_tokenizer) + image codes (data.token_cache / data.image_tokenizer)
    synthetic:  data.synthetic_pairs > 0 → random captions/prompts/codes from the run seed (no files needed)

Both give a ``Vocabulary`` (token layout), a ``Layout`` and ``list[TokenizedPair]`` in a stable order. A problem
with what ``cfg.data`` names (a pairs file that is missing, a folder, binary, empty, in the other format, or left
with no valid pair; a tokenizer or token cache that cannot be read) is a ``UserError`` led by the config key, e.g.
``data.pairs: runs/x/pairs.jsonl holds no pairs``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hermesflow_fast.data.batching import TokenizedPair
from hermesflow_fast.errors import UserError
from hermesflow_fast.model.layout import Layout, Vocabulary

__all__ = ["TrainData", "load_train_data", "synthetic_pairs", "synthetic_vocabulary"]


@dataclass
class TrainData:
    vocab: Vocabulary
    layout: Layout
    pairs: list[TokenizedPair]
    summary: str
    image_tokens: int  # N per image


def synthetic_vocabulary(text_vocab_size: int = 64, num_image_codes: int = 64) -> Vocabulary:
    return Vocabulary.build(text_vocab_size=text_vocab_size, eos=0, num_image_codes=num_image_codes)


def synthetic_pairs(n: int, vocab: Vocabulary, image_tokens: int, seed: int, caption_len: tuple[int, int] = (3, 10)
                    ) -> list[TokenizedPair]:
    """``n`` homologous pairs of random token sequences (seeded): a real DPO problem for the tiny model, no files."""
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    lo, hi = caption_len

    def text() -> list[int]:
        k = int(torch.randint(lo, hi + 1, (), generator=g))
        return torch.randint(1, vocab.text_vocab_size, (k,), generator=g).tolist()

    def codes() -> torch.Tensor:
        return torch.randint(0, vocab.num_image_codes, (image_tokens,), generator=g)

    question = [1, 2, 3]
    return [TokenizedPair(id=f"syn-{i:06d}", prompt_ids=text(), und_prompt_ids=question, image_codes=codes(),
                          caption_chosen_ids=text(), caption_rejected_ids=text(), image_chosen_codes=codes(),
                          image_rejected_codes=codes()) for i in range(n)]


def _vocab_from_file(path: str) -> Vocabulary:
    try:
        return Vocabulary.from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError) as exc:
        raise UserError(f"model.vocab: cannot read a vocabulary from {path}: {type(exc).__name__}: {exc}") from exc


def load_train_data(cfg, model_vocab: Vocabulary | None = None, log=print) -> TrainData:
    """Everything ``cfg.data`` names, validated; ``model_vocab`` is the vocabulary stored with the weights, if any."""
    d = cfg.data
    if d.synthetic_pairs > 0:
        vocab = _vocab_from_file(cfg.model.vocab) if cfg.model.vocab else (model_vocab or synthetic_vocabulary())
        n_tok = 16
        layout = Layout(vocab, t2i_text_len=d.t2i_text_len, mmu_text_len=d.max_caption_tokens)
        pairs = synthetic_pairs(d.synthetic_pairs, vocab, n_tok, cfg.run.seed)
        return TrainData(vocab, layout, pairs, f"synthetic: {len(pairs)} pairs, {n_tok} image tokens each", n_tok)
    if not d.pairs:
        raise UserError("data.pairs is not set (or set data.synthetic_pairs > 0 for generated data)")
    return _load_real(cfg, model_vocab, log)


def _load_real(cfg, model_vocab: Vocabulary | None, log) -> TrainData:
    from hermesflow_fast.data.batching import text_budgets, tokenize_pair
    from hermesflow_fast.data.image_ref import ImageCodes
    from hermesflow_fast.data.text import load_text_tokenizer, und_prompt_ids
    from hermesflow_fast.data.token_cache import TokenCache
    from hermesflow_fast.data.validate import validate_pairs

    d = cfg.data
    src = Path(d.pairs)
    root = Path(d.image_root) if d.image_root else src.parent
    records = _read_records(src, d.format, root)
    if not d.text_tokenizer:
        raise UserError("data.text_tokenizer is not set: the captions and prompts need a text tokenizer")
    tok = _named("data.text_tokenizer", load_text_tokenizer, d.text_tokenizer)
    cache = _named("data.token_cache", TokenCache, d.token_cache) if d.token_cache else None
    image_tok = None
    if d.image_tokenizer:
        from hermesflow_fast.model.tokenizer_vq import load_image_tokenizer

        image_tok = _named("data.image_tokenizer", load_image_tokenizer, d.image_tokenizer)
    num_codes = cache.num_codes if cache is not None else (image_tok.num_codes if image_tok is not None else None)
    if cfg.model.vocab:
        vocab = _vocab_from_file(cfg.model.vocab)
    elif model_vocab is not None:
        vocab = model_vocab
    else:
        if num_codes is None:
            raise UserError("the number of image codes is unknown: set data.token_cache or data.image_tokenizer")
        vocab = Vocabulary.from_tokenizer(tok, num_image_codes=num_codes)
    layout = Layout(vocab, t2i_text_len=d.t2i_text_len, mmu_text_len=d.max_caption_tokens)
    cap_budget, prompt_budget = text_budgets(layout, len(und_prompt_ids(tok)))
    code_range = min(n for n in (vocab.num_image_codes, num_codes) if n is not None)
    report = validate_pairs(records, src, root=root, text_tokenizer=tok, caption_budget=cap_budget,
                            prompt_budget=prompt_budget, truncate=d.truncate, strict=d.strict, token_cache=cache,
                            num_codes=code_range)
    log(report.summary())
    if not report.kept:
        raise UserError(f"data.pairs: none of the {report.total:,} pairs in {src} passed validation "
                        f"({report.summary()})")
    codes = ImageCodes(root, cache, image_tok)
    pairs = []
    for r in report.kept:
        q = und_prompt_ids(tok, r.question_text)
        cap_budget, prompt_budget = text_budgets(layout, len(q))
        pairs.append(tokenize_pair(r, tok, codes, caption_budget=cap_budget, prompt_budget=prompt_budget))
    n_tok = next((int(p.image_codes.numel()) for p in pairs if p.image_codes is not None), 0) or next(
        (int(p.image_chosen_codes.numel()) for p in pairs if p.image_chosen_codes is not None), 0)
    return TrainData(vocab, layout, pairs, report.summary(), n_tok)


def _named(key: str, load, value):
    """``load(value)``, a UserError it raises led by the config ``key`` that named ``value``."""
    try:
        return load(value)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from exc


def _read_records(src: Path, fmt: str, root: Path) -> list:
    """The records of ``data.pairs`` in ``data.format``; a file in the other format says which to set."""
    from hermesflow_fast.data.pairs import import_hermesflow, looks_like_hermesflow, read_pairs

    try:
        records = import_hermesflow(src, root=root) if fmt == "hermesflow" else read_pairs(src)
    except UserError as exc:
        if src.is_file() and fmt != "hermesflow" and looks_like_hermesflow(src):
            raise UserError(f"data.pairs: {src} looks like HermesFlow's pair_dpo_data.json (a JSON array or objects "
                            f"with caption_win / img_path keys), not JSONL pairs: set data.format=hermesflow "
                            f"({exc})") from exc
        if src.is_file() and fmt == "hermesflow" and not looks_like_hermesflow(src):
            raise UserError(f"data.pairs: {src} is not HermesFlow's pair_dpo_data.json; for our JSONL pairs set "
                            f"data.format=jsonl ({exc})") from exc
        raise UserError(f"data.pairs: {exc}") from exc
    if not records:
        raise UserError(f"data.pairs: {src} holds no pairs")
    return records
