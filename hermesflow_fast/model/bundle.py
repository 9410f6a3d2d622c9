"""A unified model as one object: the transformer with its vocabulary, token layout, word tokenizer and image
tokenizer, loaded from (and saved to) one folder. What self-play starts from (round 0) and saves every round as,
what evaluation and pretraining produce, for the shapes world and for real data alike.

    config.json, model.safetensors   the transformer (``UnifiedTransformer.save_pretrained``); ``config.json``'s
                                     "hermesflow" block carries ``vocab`` (the Vocabulary dict) and ``layout``
                                     ({t2i_text_len, mmu_text_len})
    vocab.json                       the Vocabulary dict again, for people and tools that read no model config
    tokenizer/                       the word tokenizer, its [PAD] and Show-o specials already added
    vq/                              the image tokenizer (``load_image_tokenizer``)
    pretrain.json                    how ``hermesflow pretrain`` made it (only in pretrained folders; not read here)

``load_bundle(path)`` reads any folder saved by ``ModelBundle.save`` (``world.shipped.load_base()`` the shapes
world's shipped one). Loading checks that the pieces agree (vocabulary vs tokenizer, codes vs image tokenizer,
vocabulary size vs model) and names the file that disagrees.

    python -m pytest -q tests/model/test_bundle.py
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hermesflow_fast.model.layout import Layout, Vocabulary
from hermesflow_fast.model.tokenizer_vq import ImageTokenizer, load_image_tokenizer
from hermesflow_fast.model.transformer import UnifiedTransformer

__all__ = ["ModelBundle", "assemble_bundle", "load_bundle"]

_FILES = ("config.json", "model.safetensors", "vocab.json", "tokenizer", "vq")


@dataclass
class ModelBundle:
    """A unified model ready to generate and to train: ``model`` (eval mode after loading), its ``vocab`` and
    ``layout``, ``text_tokenizer`` (a HF fast tokenizer) and ``image_tokenizer`` (codes ↔ pixels)."""

    model: UnifiedTransformer
    vocab: Vocabulary
    layout: Layout
    text_tokenizer: Any
    image_tokenizer: ImageTokenizer
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def num_image_tokens(self) -> int:
        """N, the code grid's size (64 for the world's 8×8 grid)."""
        h, w = self.image_tokenizer.grid
        return h * w

    def to(self, device: torch.device | str) -> ModelBundle:
        self.model.to(device)
        self.image_tokenizer.to(device)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder described in the module docstring (``pretrain.json`` excepted); returns its path."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.model.config
        cfg.extra = {**cfg.extra, "vocab": self.vocab.to_dict(),
                     "layout": {"t2i_text_len": self.layout.t2i_text_len, "mmu_text_len": self.layout.mmu_text_len}}
        self.model.save_pretrained(path)
        (path / "vocab.json").write_text(json.dumps(self.vocab.to_dict(), indent=2) + "\n")
        self.text_tokenizer.save_pretrained(str(path / "tokenizer"))
        self.image_tokenizer.save_pretrained(path / "vq")
        self.path = path
        return path

    def __repr__(self) -> str:
        c = self.model.config
        return (f"ModelBundle(path={str(self.path)!r}, params={sum(p.numel() for p in self.model.parameters()):,}, "
                f"d={c.hidden_size}, layers={c.num_hidden_layers}, vocab={c.vocab_size}, "
                f"codes={self.vocab.num_image_codes}, grid={self.image_tokenizer.grid}, "
                f"t2i_text_len={self.layout.t2i_text_len}, mmu_text_len={self.layout.mmu_text_len})")


def load_bundle(path: str | os.PathLike, device: torch.device | str = "cpu",
                default_layout: dict[str, int] | None = None, hint: str = "") -> ModelBundle:
    """The bundle saved at ``path``, in eval mode. ``default_layout``: the text budgets of a folder whose config.json
    carries none; ``hint`` is added to the missing-files error (how to make the folder).

    FileNotFoundError names the missing files; ValueError names the file whose contents disagree with the rest."""
    from hermesflow_fast.data.text import load_text_tokenizer

    path = Path(path)
    missing = [f for f in _FILES if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"load_bundle: {path} lacks {missing}; expected a folder written by ModelBundle.save"
                                f"{hint}")
    try:
        vocab = Vocabulary.from_dict(json.loads((path / "vocab.json").read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path / 'vocab.json'}: not a Vocabulary dict ({type(exc).__name__}: {exc})") from exc
    model = UnifiedTransformer.from_pretrained(path)
    model.eval().requires_grad_(False)
    cfg = model.config
    if cfg.vocab_size != vocab.vocab_size:
        raise ValueError(f"{path / 'config.json'}: vocab_size {cfg.vocab_size} but vocab.json gives "
                         f"{vocab.vocab_size} (image_offset {vocab.image_offset} + {vocab.num_image_codes} codes + "
                         f"[MASK])")
    saved_vocab = cfg.extra.get("vocab")
    if saved_vocab is not None and Vocabulary.from_dict(saved_vocab) != vocab:
        raise ValueError(f"{path}: config.json's hermesflow.vocab differs from vocab.json")
    text_tokenizer = load_text_tokenizer(path / "tokenizer")
    from_tok = Vocabulary.from_tokenizer(text_tokenizer, vocab.num_image_codes)
    if from_tok != vocab:
        raise ValueError(f"{path / 'tokenizer'}: its ids give {from_tok.to_dict()}, vocab.json says "
                         f"{vocab.to_dict()}; the tokenizer was not saved with this model")
    image_tokenizer = load_image_tokenizer(path / "vq", device=device)
    if image_tokenizer.num_codes != vocab.num_image_codes:
        raise ValueError(f"{path / 'vq'}: {image_tokenizer.num_codes} codes, but the vocabulary has "
                         f"{vocab.num_image_codes} image codes")
    lens = {**(default_layout or {}), **cfg.extra.get("layout", {})}
    if set(lens) != {"t2i_text_len", "mmu_text_len"}:
        raise ValueError(f"{path / 'config.json'}: no hermesflow.layout (t2i_text_len, mmu_text_len) and no default")
    layout = Layout(vocab, t2i_text_len=int(lens["t2i_text_len"]), mmu_text_len=int(lens["mmu_text_len"]))
    return ModelBundle(model.to(device), vocab, layout, text_tokenizer, image_tokenizer, path)


def assemble_bundle(model: str | os.PathLike, image_tokenizer: str | os.PathLike, text_tokenizer: str | os.PathLike,
                    t2i_text_len: int, mmu_text_len: int, device: torch.device | str = "cpu") -> ModelBundle:
    """A bundle from its parts as published: ``model`` a transformer folder (HF Phi, Show-o's layout with its
    ``showo.`` keys, or ours), ``image_tokenizer`` an image tokenizer folder (MAGVIT-v2 as Show-o saves it, or a
    patch-VQ save), ``text_tokenizer`` a HF tokenizer folder (phi-1.5's for Show-o; [PAD] and Show-o's specials are
    added as Show-o adds them). ValueError when the pieces disagree (the model's vocabulary size against the
    tokenizer's ids plus the image codes), naming both."""
    from hermesflow_fast.data.text import load_text_tokenizer
    from hermesflow_fast.errors import UserError

    image_tok = load_image_tokenizer(image_tokenizer, device=device)
    text_tok = load_text_tokenizer(text_tokenizer)
    vocab = Vocabulary.from_tokenizer(text_tok, num_image_codes=image_tok.num_codes)
    net = UnifiedTransformer.from_pretrained(model)
    if net.config.vocab_size != vocab.vocab_size:
        raise UserError(f"{model}: vocab_size {net.config.vocab_size}, but the tokenizer in {text_tokenizer} "
                        f"({len(text_tok)} ids with [PAD] and Show-o's specials) and the {image_tok.num_codes} codes "
                        f"of {image_tokenizer} (+ [MASK]) give {vocab.vocab_size}")
    net.eval().requires_grad_(False)
    layout = Layout(vocab, t2i_text_len=t2i_text_len, mmu_text_len=mmu_text_len)
    return ModelBundle(net.to(device), vocab, layout, text_tok, image_tok)
