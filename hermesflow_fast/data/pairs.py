"""Homologous preference pairs: our JSONL schema, its reader and atomic writer, and the importer of HermesFlow's
``pair_dpo_data.json``.

One pair per line (JSONL, UTF-8). A pair holds both sides of HermesFlow's record (x, y, x_w, x_l, y_w, y_l):

    id                str    unique in the file (an int is read as its decimal string)
    prompt            str    y: the t2i prompt, which is also the ground-truth caption of the real image
    image             ref    x: the real image; the understanding side's condition (never a grey image)
    caption_chosen    str    y_w ┐ understanding side: both present, or both absent / null (no und side)
    caption_rejected  str    y_l ┘
    image_chosen      ref    x_w ┐ generation side: both present, or both absent / null (no gen side)
    image_rejected    ref    x_l ┘
    question          str    optional understanding prompt; absent = DEFAULT_QUESTION (HermesFlow's training one)
    scores            dict   optional {name: number}, carried along (e.g. the scorer's values of both sides)

An image ``ref`` is either a path relative to the JSONL file's folder (absolute paths are kept as they are) or
``cache:<record id>``, a row of a token cache (data/token_cache.py). Readers resolve nothing: validation
(data/validate.py) checks images and sides, and reports every problem with file, line and id.

HermesFlow's ``pair_dpo_data.json`` comes in two forms, both read by ``import_hermesflow``: the README's
JSON array ``[{…}, {…}]``, and the ``{…},\\n{…},\\n`` object stream (no brackets, trailing comma) its curation scripts
append to. Fields are mapped by ``HERMESFLOW_FIELDS``:

    HermesFlow        ours                 note
    id                id                   str(id); a record without one gets sha1(img_path + "\\n" + caption)[:12]
    caption           prompt               HermesFlow's ground truth, t2i prompt and DPO text condition (§3.1)
    img_path          image                relative to HermesFlow's repo root (pass ``root`` to make them absolute)
    caption_win       caption_chosen
    caption_lose      caption_rejected
    image_win         image_chosen         datasets/journeydb/generated_images/<id>/<k>.png
    image_lose        image_rejected
    bert_score_win    scores["und_chosen"]     raw BERT-large [CLS] cosine
    bert_score_lose   scores["und_rejected"]
    vqa_score_win     scores["gen_chosen"]     self-VQA accuracy
    vqa_score_lose    scores["gen_rejected"]
    prompt            (not imported)       the original JourneyDB prompt, which HermesFlow only passes through

No question is imported: HermesFlow trains captions under "Give a detailed caption for this image.", our default.
Duplicates (an append-mode rerun writes every record again) are imported as they are; validation reports them.

Every problem with the file itself (missing, a folder, not UTF-8 text, a line or object that is not a pair) is a
``UserError`` naming the file and line; ``looks_like_hermesflow(path)`` tells a caller that read HermesFlow's file as
JSONL (or the reverse) which format to ask for.

    python -m pytest -q tests/data/test_pairs.py
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hermesflow_fast.errors import UserError
from hermesflow_fast.io import atomic_path, decode_text, read_jsonl

__all__ = [
    "CACHE_PREFIX",
    "DEFAULT_QUESTION",
    "HERMESFLOW_FIELDS",
    "PairRecord",
    "derived_id",
    "import_hermesflow",
    "looks_like_hermesflow",
    "read_pairs",
    "write_pairs",
]

DEFAULT_QUESTION = "Give a detailed caption for this image."
CACHE_PREFIX = "cache:"

# HermesFlow key -> our field ("scores.<name>" = an entry of ``scores``; None = not imported)
HERMESFLOW_FIELDS: dict[str, str | None] = {
    "id": "id",
    "caption": "prompt",
    "img_path": "image",
    "caption_win": "caption_chosen",
    "caption_lose": "caption_rejected",
    "image_win": "image_chosen",
    "image_lose": "image_rejected",
    "bert_score_win": "scores.und_chosen",
    "bert_score_lose": "scores.und_rejected",
    "vqa_score_win": "scores.gen_chosen",
    "vqa_score_lose": "scores.gen_rejected",
    "prompt": None,
}

_TEXT_FIELDS = ("id", "prompt", "image", "caption_chosen", "caption_rejected", "image_chosen", "image_rejected",
                "question")


@dataclass
class PairRecord:
    """One homologous preference pair; a field is None when absent from the source (validation decides)."""

    id: str | None
    prompt: str | None
    image: str | None = None
    caption_chosen: str | None = None
    caption_rejected: str | None = None
    image_chosen: str | None = None
    image_rejected: str | None = None
    question: str | None = None  # None = DEFAULT_QUESTION
    scores: dict[str, float] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)  # line of the source file it was read from

    @property
    def has_und(self) -> bool:
        """The understanding side is declared (at least one caption given)."""
        return self.caption_chosen is not None or self.caption_rejected is not None

    @property
    def has_gen(self) -> bool:
        """The generation side is declared (at least one image given)."""
        return self.image_chosen is not None or self.image_rejected is not None

    @property
    def question_text(self) -> str:
        return DEFAULT_QUESTION if self.question is None else self.question

    def to_json(self) -> dict[str, Any]:
        """The JSONL object: all side fields (null when absent); question and scores only when set."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _TEXT_FIELDS if k != "question"}
        if self.question is not None:
            out["question"] = self.question
        if self.scores:
            out["scores"] = dict(self.scores)
        return out


_KNOWN = {f.name for f in fields(PairRecord)} - {"line"}


def _record(obj: Any, where: str) -> PairRecord:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KNOWN)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}; a pair has {sorted(_KNOWN)}")
    kw: dict[str, Any] = {}
    for k in _TEXT_FIELDS:
        v = obj.get(k)
        if k == "id" and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if v is not None and not isinstance(v, str):
            raise UserError(f"{where}: field {k!r} must be a string or null, got {type(v).__name__} {v!r:.60}")
        kw[k] = v
    scores = obj.get("scores") or {}
    if not isinstance(scores, dict) or any(
            not isinstance(s, (int, float)) or isinstance(s, bool) for s in scores.values()):
        raise UserError(f"{where}: \"scores\" must be an object of numbers, got {scores!r:.80}")
    return PairRecord(**kw, scores={str(k): float(s) for k, s in scores.items()})


def read_pairs(path: str | os.PathLike) -> list[PairRecord]:
    """The pairs of a JSONL file in file order (blank lines skipped; ``record.line`` = its line number).

    Raises UserError (a ValueError) naming the file for a missing file, a folder or bytes that are not UTF-8 text,
    and file:line for a line that is not a JSON object, an unknown field or a field of the wrong type. Missing
    fields, bad images and duplicate ids are left to ``validate_pairs``."""
    path = _pairs_file(path)
    records = []
    for lineno, obj in read_jsonl(path, invalid="not JSON", error=UserError, hint=_NOT_TEXT):
        rec = _record(obj, f"{path}:{lineno}")
        rec.line = lineno
        records.append(rec)
    return records


_NOT_TEXT = "; a pairs file is JSON text"


def _pairs_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path; UserError naming it when it is missing, a folder or not a regular file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, expected a file of pairs (JSONL, or HermesFlow's pair_dpo_data.json)")
    if not path.is_file():
        raise UserError(f"{path} does not exist" if not path.exists() else f"{path} is not a regular file")
    return path


def _read_text(path: Path, encoding: str) -> str:
    """The text of a pairs file; UserError naming it when it is missing, a folder or not UTF-8."""
    path = _pairs_file(path)
    return decode_text(path.read_bytes(), path, encoding=encoding, error=UserError, hint=_NOT_TEXT)


_HERMESFLOW_ONLY = tuple(f'"{k}"' for k in HERMESFLOW_FIELDS if k not in ("id", "prompt"))


def looks_like_hermesflow(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like HermesFlow's ``pair_dpo_data.json`` (a JSON array, or objects with its keys
    such as ``caption_win`` / ``img_path``) rather than our JSONL; reads at most its first 64 KiB."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    except OSError:
        return False
    return head.startswith("[") or any(k in head for k in _HERMESFLOW_ONLY)


def write_pairs(path: str | os.PathLike, records: list[PairRecord]) -> None:
    """Write ``records`` as JSONL, atomically: a temp file in the same folder, fsynced, then renamed over ``path``
    (a reader sees the old file or the new one, never half of one)."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# HermesFlow import
# ---------------------------------------------------------------------------------------------------------------------


def derived_id(image: str, caption: str) -> str:
    """The stable id of a HermesFlow record without one: the first 12 hex digits of sha1(img_path + "\\n" + caption)."""
    return hashlib.sha1(f"{image}\n{caption}".encode()).hexdigest()[:12]


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"{line}:{col} (byte offset {len(text[:pos].encode('utf-8'))})"


def _objects(text: str, file: Path) -> list[tuple[int, Any]]:
    """(line, value) of every top-level object of a JSON array ``[{…}, …]`` or of a stream ``{…},{…},`` (each object
    optionally followed by one comma, so JSON Lines read too). Errors name file:line:column and the byte offset."""
    decoder = json.JSONDecoder()
    n, pos, out = len(text), 0, []

    def skip(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    array = pos < n and text[pos] == "["
    if array:
        pos = skip(pos + 1)
    while True:
        if pos >= n:
            if array:
                raise UserError(f"{file}:{_position(text, pos)}: the JSON array is not closed with ']'")
            break
        if array and text[pos] == "]":
            rest = skip(pos + 1)
            if rest < n:
                raise UserError(f"{file}:{_position(text, rest)}: unexpected text after the closing ']'")
            break
        if text[pos] != "{":
            raise UserError(f"{file}:{_position(text, pos)}: expected a JSON object '{{', got {text[pos:pos + 20]!r}")
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}:{_position(text, exc.pos)}: not JSON ({exc.msg}) in the object starting at "
                             f"{_position(text, pos)}") from exc
        out.append((text.count("\n", 0, pos) + 1, obj))
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
        elif array and pos < n and text[pos] != "]":
            raise UserError(f"{file}:{_position(text, pos)}: expected ',' between objects, got "
                             f"{text[pos:pos + 20]!r}")
    return out


def import_hermesflow(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> list[PairRecord]:
    """The records of HermesFlow's ``pair_dpo_data.json`` (array or object stream), mapped by HERMESFLOW_FIELDS.

    ``root``: HermesFlow's repo root, which its image paths are relative to; given, relative paths become
    ``root/path`` (so the records can be written anywhere), else they are kept as they are. ``record.line`` is the
    line the object starts on. Raises UserError (a ValueError) naming file:line for bad JSON, a non-object, an
    unknown key or a value of the wrong type, and the file when it is missing, a folder or not UTF-8 text."""
    path = Path(path)
    text = _read_text(path, "utf-8-sig")
    records = []
    for line, obj in _objects(text, path):
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(HERMESFLOW_FIELDS))
        if unknown:
            raise UserError(f"{where}: unknown HermesFlow key(s) {unknown}; pair_dpo_data.json records have "
                             f"{sorted(HERMESFLOW_FIELDS)}")
        ours: dict[str, Any] = {"scores": {}}
        for key, value in obj.items():
            target = HERMESFLOW_FIELDS[key]
            if target is None or value is None:
                continue
            if target.startswith("scores."):
                ours["scores"][target.removeprefix("scores.")] = value
            else:
                ours[target] = value
        if ours.get("id") is None and isinstance(ours.get("image"), str) and isinstance(ours.get("prompt"), str):
            ours["id"] = derived_id(ours["image"], ours["prompt"])
        if root is not None:
            for k in ("image", "image_chosen", "image_rejected"):
                v = ours.get(k)
                if isinstance(v, str) and not v.startswith(CACHE_PREFIX) and not Path(v).is_absolute():
                    ours[k] = str(Path(root) / v)
        rec = _record(ours, where)
        rec.line = line
        records.append(rec)
    return records
