"""Scorers for real data (the shapes world scores exactly, ``world/scoring.py``): sentence embeddings from a LOCAL
model folder, never the network.

    TextEmbedder(path, kind)      L2-normalized embeddings, batched: kind "sbert" (sentence-transformers, the optional
                                  extra ``pip install hermesflow_fast[scorers]``) or "bert-cls" (transformers'
                                  AutoModel, the [CLS] vector: the original code's BERT-CLS cosine)
    EmbeddingCaptionScorer(emb)   caption_scorer for ``und_scores``: cosine(candidate, true caption); the truth is
                                  embedded once per record (cached by text), a record's K candidates in one batch
    EmbeddingAnswerMatcher(emb)   answer_match for ``gen_scores``: the exact match after normalisation, else the choice
                                  nearest to the free-form answer (cosine ≥ ``min_similarity``, else None)

    scorer = EmbeddingCaptionScorer(TextEmbedder("/models/all-MiniLM-L6-v2", "sbert"))
    und_scores(records, candidates, journal, scorer)

A model folder that cannot be used is a ``UserError`` naming it: missing, unreadable by transformers, or holding
pickled weights (``pytorch_model*.bin`` with no ``*.safetensors`` beside them) that carry anything but tensors; such
a file is named, and refused before transformers or sentence-transformers unpickle it.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from hermesflow_fast.errors import UserError
from hermesflow_fast.world.scoring import answer_match, normalise_answer

__all__ = ["KINDS", "EmbeddingAnswerMatcher", "EmbeddingCaptionScorer", "TextEmbedder"]

KINDS = ("sbert", "bert-cls")


class TextEmbedder:
    """Sentence embeddings (n, d), L2-normalized, from a local model folder."""

    def __init__(self, path: str | os.PathLike, kind: str = "sbert", device: str | torch.device = "cpu",
                 batch_size: int = 64, max_length: int | None = None):
        if kind not in KINDS:
            raise UserError(f"TextEmbedder: kind must be one of {KINDS}, got {kind!r}")
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"TextEmbedder: scorer model folder {path} does not exist; pass a local "
                            f"{'sentence-transformers' if kind == 'sbert' else 'BERT'} model folder "
                            f"(nothing is downloaded)")
        _check_pickled_weights(path)
        self.path, self.kind, self.device = path, kind, torch.device(device)
        self.batch_size, self.max_length = batch_size, max_length
        if kind == "sbert":
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ImportError("TextEmbedder(kind='sbert') needs sentence-transformers: "
                                  "pip install 'hermesflow_fast[scorers]' (or use kind='bert-cls')") from exc
            try:
                self._st = SentenceTransformer(str(path), device=str(self.device))
            except pickle.UnpicklingError as exc:
                raise UserError(f"TextEmbedder: {path}: refused to unpickle a weights file of this folder "
                                f"({_first_line(exc)})") from exc
        else:
            from transformers import AutoModel, AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                self._model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
            except pickle.UnpicklingError as exc:
                raise UserError(f"TextEmbedder: {path}: refused to unpickle a weights file of this folder "
                                f"({_first_line(exc)})") from exc
            except (OSError, ValueError) as exc:
                raise UserError(f"TextEmbedder: cannot load a BERT model and tokenizer from {path}: "
                                f"{_first_line(exc)}") from exc
            if self._tok.pad_token is None:
                self._tok.pad_token = self._tok.eos_token or self._tok.unk_token
            self._drop_types = "token_type_ids" not in inspect.signature(self._model.forward).parameters
            if self.max_length is None:  # the model's own limit: BERT-large's 512, where the original truncates
                self.max_length = int(getattr(self._model.config, "max_position_embeddings", 512))

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, 0)
        if self.kind == "sbert":
            out = self._st.encode(texts, batch_size=self.batch_size, convert_to_tensor=True)
            return torch.nn.functional.normalize(out.float().cpu(), dim=-1)
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            enc = self._tok(texts[i:i + self.batch_size], padding=True, truncation=True,
                            max_length=self.max_length, return_tensors="pt").to(self.device)
            if self._drop_types:
                enc.pop("token_type_ids", None)
            chunks.append(self._model(**enc).last_hidden_state[:, 0].float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_pickled_weights(folder: Path) -> None:
    """Refuse, naming it, a ``pytorch_model*.bin`` of ``folder`` or a module subfolder (sentence-transformers keeps
    modules in subfolders) that would be unpickled (no ``*.safetensors`` beside it) and holds anything but tensors:
    each is read once with ``torch.load(weights_only=True)`` (``load_state_dict_file``)."""
    from hermesflow_fast.model.weights import load_state_dict_file

    for d in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if any(d.glob("*.safetensors")):
            continue
        for f in sorted(d.glob("pytorch_model*.bin")):
            load_state_dict_file(f)  # CheckpointError (a UserError) naming f when it carries other objects


class EmbeddingCaptionScorer:
    """``caption_scorer(caption, truth) -> cosine``; ``score_many(captions, truth)`` embeds the truth once (cached)
    and the captions in one batch (``und_scores`` uses it when present)."""

    def __init__(self, embedder: TextEmbedder, cache_size: int = 4096):
        self.embedder = embedder
        self._truth: dict[str, Tensor] = {}
        self._cache_size = cache_size

    def _truth_vec(self, truth: str) -> Tensor:
        vec = self._truth.get(truth)
        if vec is None:
            if len(self._truth) >= self._cache_size:
                self._truth.pop(next(iter(self._truth)))
            vec = self._truth[truth] = self.embedder.embed([truth])[0]
        return vec

    def score_many(self, captions: Sequence[str], truth: str) -> list[float]:
        if not isinstance(truth, str):
            raise TypeError(f"EmbeddingCaptionScorer: the record's truth must be its true caption (str), got "
                            f"{type(truth).__name__}")
        if not captions:
            return []
        return (self.embedder.embed(captions) @ self._truth_vec(truth)).tolist()

    def __call__(self, caption: str, truth: str) -> float:
        return self.score_many([caption], truth)[0]


class EmbeddingAnswerMatcher:
    """``answer_match(answer, choices)`` with an embedding fallback: the exact choice after normalisation, else the
    choice whose embedding is nearest to the answer's when their cosine is ≥ ``min_similarity``, else None."""

    def __init__(self, embedder: TextEmbedder, min_similarity: float = 0.5):
        self.embedder, self.min_similarity = embedder, min_similarity

    def __call__(self, free_form_answer: str, choices: Sequence[str]) -> str | None:
        exact = answer_match(free_form_answer, choices)
        if exact is not None or not choices or not normalise_answer(free_form_answer):
            return exact
        vecs = self.embedder.embed([free_form_answer, *choices])
        sims = vecs[1:] @ vecs[0]
        best = int(sims.argmax())
        return choices[best] if float(sims[best]) >= self.min_similarity else None
