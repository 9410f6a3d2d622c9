"""Real-data curation records for self-play: a JSONL records file (image, prompt, caption) plus a TIFA question file,
joined by id, each image encoded once by the model's image tokenizer (the shapes world's records come from
``record_source.world_curation_records`` instead; both reach the rounds through ``record_source.RecordSource``).

Records file (UTF-8, one JSON object per line; blank lines are skipped, other keys are ignored):

    {"id": "coco-000139", "image": "images/000139.png", "prompt": "a dog on a sofa", "caption": "a brown dog ..."}

    id        str   unique in the file; the question file joins on it (an integer id is read as its string)
    image     str   image path, relative to the records file's folder (absolute paths kept)
    caption   str   the ground-truth caption the model's captions are scored against (the record's ``truth``)
    prompt    str   the text-to-image prompt; absent → the caption

Images: read with PIL, converted to RGB only where the tokenizer allows it (``convert_to_rgb``), resized so the
shorter side is the tokenizer's size (bicubic) and centre-cropped to its (H, W) (Show-o's transform; an image already
at that size is untouched), mapped to [−1, 1] as (x/255 − 0.5)/0.5, and encoded in batches:
``CurationRecord(id, prompt, codes (N,), questions, truth=caption)``, in file order.

Problems are named with the file, the line and the id: not JSON, not an object, a missing key, a value that is not a
non-empty string, a repeated id, a missing or unreadable image, a record with no question. ``strict=True`` raises one
ValueError listing every kind with its count and first instance, before any image is decoded (an image that only
fails when decoded raises then); ``strict=False`` skips those records and says once how many and why. An empty file,
or one with nothing left, is always an error. Questions whose id names no record are ignored (a TIFA question bank
may cover more prompts than the records) and counted in the log.

    hermesflow selfplay --config configs/selfplay-real.yaml --run-dir runs/real \\
        data.records=data/real/records.jsonl data.questions=data/real/questions.json \\
        data.scorer_model=models/all-MiniLM-L6-v2 world.base=models/my-world-model

    python -m pytest -q tests/selfplay/test_sources.py
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from hermesflow_fast.data.image_ref import image_problem, resolve_path
from hermesflow_fast.io import read_lines
from hermesflow_fast.model.tokenizer_vq import CONVERTIBLE_MODES, image_to_tensor
from hermesflow_fast.selfplay.stages import CurationRecord
from hermesflow_fast.selfplay.tifa import RealQuestion, load_tifa_questions

__all__ = ["RealRecord", "fit_image", "load_real_records", "read_real_records", "real_scorers"]

_REQUIRED = ("id", "image", "caption")


@dataclass(frozen=True)
class RealRecord:
    """One line of a records file: the image's resolved path and the line it came from (for messages)."""

    id: str
    image: Path
    prompt: str
    caption: str
    line: int


class _Problems:
    """Problems by kind, each instance a location ("file:line N (id 'x'): detail"); strict raises, else logs."""

    def __init__(self, path: Path):
        self.path = path
        self.kinds: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, line: int, rid: str | None, detail: str = "") -> None:
        where = f"{self.path}:line {line}" + (f" (id {rid!r})" if rid is not None else "")
        self.kinds[kind].append(where + (f": {detail}" if detail else ""))

    def summary(self) -> str:
        return "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in self.kinds.items())

    def count(self) -> int:
        return sum(map(len, self.kinds.values()))

    def raise_any(self) -> None:
        if self.kinds:
            raise ValueError(f"records file {self.path}: {self.summary()}")

    def raise_if_none_left(self, kept: int) -> None:
        if not kept:
            raise ValueError(f"records file {self.path}: no usable records left; {self.summary()}")

    def settle(self, strict: bool, kept: int, total: int, log: Callable[[str], None]) -> None:
        """Strict: raise on any problem; else say what was skipped."""
        self.raise_if_none_left(kept)
        if strict:
            self.raise_any()
        elif self.kinds:
            log(f"records file {self.path}: kept {kept} of {total} records; skipped {self.count()}: "
                f"{self.summary()}")


def _parse(path: Path, problems: _Problems) -> tuple[list[RealRecord], int]:
    """The well-formed records of ``path`` (first of a repeated id kept) and how many records the file holds."""
    out: list[RealRecord] = []
    seen: dict[str, int] = {}
    total = 0
    for n, line in read_lines(path):
        total += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add("not valid JSON", n, None, exc.msg)
            continue
        if not isinstance(row, dict):
            problems.add("not an object", n, None, f"got {type(row).__name__}")
            continue
        rid = str(row["id"]) if "id" in row else None
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            problems.add(f"missing {', '.join(missing)}", n, rid)
            continue
        row.setdefault("prompt", row["caption"])
        if isinstance(row["id"], int) and not isinstance(row["id"], bool):
            row["id"] = rid = str(row["id"])  # numeric ids (COCO's) join as strings, as the question loader's
        bad = [k for k in ("id", "image", "caption", "prompt") if not isinstance(row[k], str) or not row[k]]
        if bad:
            problems.add("value not a non-empty string", n, rid, ", ".join(f"{k}={row[k]!r}" for k in bad))
            continue
        rid = row["id"]
        if rid in seen:
            problems.add("repeated id", n, rid, f"first on line {seen[rid]}")
            continue
        seen[rid] = n
        image = resolve_path(row["image"], path.parent)
        why = image_problem(image)
        if why is not None:
            kind, _, detail = why.partition(": ")
            problems.add(f"{kind} image", n, rid, detail)
            continue
        out.append(RealRecord(rid, image, row["prompt"], row["caption"], n))
    return out, total


def read_real_records(path: str | os.PathLike, strict: bool = True,
                      log: Callable[[str], None] = print) -> list[RealRecord]:
    """The records of a records file, in file order, every image checked to exist and be readable (see the module
    docstring). FileNotFoundError if the file is missing; ValueError on an empty file or (``strict``) any problem."""
    records, total, problems = _read(Path(path))
    problems.settle(strict, len(records), total, log)
    return records


def _read(path: Path) -> tuple[list[RealRecord], int, _Problems]:
    """(well-formed records, records in the file, problems so far); the problems are not settled yet."""
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} does not exist")
    problems = _Problems(path)
    records, total = _parse(path, problems)
    if total == 0:
        raise ValueError(f"records file {path}: no records (the file is empty)")
    problems.raise_if_none_left(len(records))
    return records, total, problems


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the shorter side fits (H, W) (bicubic), then centre-crop to exactly (H, W); same size → unchanged."""
    H, W = size
    w, h = image.size
    if (h, w) == (H, W):
        return image
    scale = max(H / h, W / w)
    rw, rh = max(W, round(w * scale)), max(H, round(h * scale))
    image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - W) // 2, (rh - H) // 2
    return image.crop((left, top, left + W, top + H))


def _load(path: Path, size: tuple[int, int], convert_to_rgb: bool) -> Tensor:
    """(3, H, W) float32 in [−1, 1]; ValueError (message starting with the path) if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                if not (convert_to_rgb and im.mode in CONVERTIBLE_MODES):
                    return image_to_tensor(im, None, convert_to_rgb, name=str(path))  # raises: the mode's message
                im = im.convert("RGB")
            return image_to_tensor(fit_image(im, size), size, name=str(path))
    except ValueError:
        raise
    except Exception as exc:  # OSError (truncated), SyntaxError, … from a file that passed PIL's verify
        raise ValueError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc})") from exc


def load_real_records(path: str | os.PathLike, questions: str | os.PathLike, image_tokenizer: Any,
                      strict: bool, batch_size: int,
                      log: Callable[[str], None] = print) -> list[CurationRecord]:
    """Curation records of a real-data records file (module docstring): questions joined by id from the TIFA file
    ``questions``, images encoded once by ``image_tokenizer`` (an ImageTokenizer: ``image_size``,
    ``convert_to_rgb``, ``device``, ``encode``), ``truth`` = the caption. In file order."""
    path = Path(path)
    records, total, problems = _read(path)
    if strict:
        problems.raise_any()  # before the question file is read or any image decoded
    by_id = load_tifa_questions(questions, record_ids=None, strict=strict, log=log)
    joined: list[tuple[RealRecord, list[RealQuestion]]] = []
    for r in records:
        qs = by_id.get(r.id)
        if not qs:
            problems.add("record without questions", r.line, r.id, f"no question in {questions} has this id")
            continue
        joined.append((r, qs))
    extra = sorted(set(by_id) - {r.id for r in records})
    if extra:
        log(f"question file {questions}: ignored the questions of {len(extra)} id(s) not in {path} "
            f"(e.g. {extra[0]!r})")
    problems.raise_if_none_left(len(joined))
    if strict:
        problems.raise_any()

    tok = image_tokenizer
    size = (int(tok.image_size[0]), int(tok.image_size[1]))
    convert = bool(tok.convert_to_rgb)
    out: list[CurationRecord] = []
    for i in range(0, len(joined), batch_size):
        batch, pixels = [], []
        for r, qs in joined[i:i + batch_size]:
            try:
                pixels.append(_load(r.image, size, convert))  # (3, H, W)
            except ValueError as exc:
                problems.add("unusable image", r.line, r.id, str(exc))
                if strict:
                    problems.raise_any()
                continue
            batch.append((r, qs))
        if not batch:
            continue
        with torch.no_grad():
            codes = tok.encode(torch.stack(pixels).to(tok.device)).cpu().long()  # (B, N)
        out.extend(CurationRecord(r.id, r.prompt, c, list(qs), r.caption) for (r, qs), c in zip(batch, codes))
    problems.settle(strict, len(out), total, log)
    return out


def real_scorers(model: str | os.PathLike, kind: str, min_similarity: float, device: str | torch.device,
                 answer_model: str | os.PathLike | None, answer_kind: str | None) -> tuple[Any, Any]:
    """(caption_scorer, answer_match) for real data: ``EmbeddingCaptionScorer`` over a ``TextEmbedder`` of the
    local folder ``model`` for ``und_scores``, ``EmbeddingAnswerMatcher`` for ``gen_scores`` over the same embedder,
    or over ``answer_model`` (kind ``answer_kind``, default ``kind``) when given (the original scores captions with
    BERT-CLS and maps answers with SBERT)."""
    from hermesflow_fast.selfplay.scorers import EmbeddingAnswerMatcher, EmbeddingCaptionScorer, TextEmbedder

    emb = TextEmbedder(model, kind, device=device)
    answers = emb if answer_model is None else TextEmbedder(answer_model, answer_kind or kind, device=device)
    return EmbeddingCaptionScorer(emb), EmbeddingAnswerMatcher(answers, min_similarity=min_similarity)
