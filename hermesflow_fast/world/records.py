"""Homologous records of the shapes world: a scene, its caption (= t2i prompt) and its questions; made from a seed,
written as JSONL + PNGs, read back.

``make_records(n, seed, split)``: record i of a split draws from its own stream
``numpy.random.default_rng([seed, split code, i])`` (split codes: train 0, heldout 1), so the splits never share a
stream, ``make_records(m)[:n] == make_records(n)`` for m ≥ n, and every process makes the same records. Ids are
"{split}-{i:06d}", disjoint across splits. Record i's GenEval category is ``CATEGORIES[i % 6]`` (balanced). The world
has only a few hundred distinct captions, so held-out captions recur in train; their images (sizes, positions) and
ids do not.

File (one record per line, UTF-8; PNGs 32×32 RGB):

    id          str     "train-000042"
    category    str     the GenEval category the scene was drawn for
    caption     str     the ground-truth caption
    prompt      str     the t2i prompt (= caption)
    image       str     PNG path relative to the JSONL file's folder
    questions   list    [{id, category, text, choices, answer}, …]
    scene       dict    {objects: [{shape, colour, x, y, size}, …], relation}

``read_records(path)`` checks every line and raises ValueError naming ``file:line`` (and the record id when known);
``WorldRecord.image`` is then the PNG's absolute path (None for records made in memory).

    python -m pytest -q tests/world/test_world_records.py
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hermesflow_fast.world.grammar import caption, parse_caption
from hermesflow_fast.world.questions import Question, make_questions
from hermesflow_fast.world.scene import CANVAS, CATEGORIES, Scene, render, sample_scene

__all__ = ["SPLITS", "WorldRecord", "make_record", "make_records", "read_records", "write_records"]

SPLITS = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class WorldRecord:
    id: str
    category: str  # GenEval category the scene was drawn for
    scene: Scene
    caption: str
    prompt: str  # the t2i prompt: the caption
    questions: tuple[Question, ...]
    image: Path | None = None  # the PNG, once written or read

    def render(self, size: int = CANVAS) -> np.ndarray:
        """The record's image, (size, size, 3) uint8."""
        return render(self.scene, size)


def make_record(seed: int, split: str, index: int) -> WorldRecord:
    """Record ``index`` of ``split`` for ``seed`` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"make_records: split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    category = CATEGORIES[index % len(CATEGORIES)]
    scene = sample_scene(rng, category)
    rid = f"{split}-{index:06d}"
    text = caption(scene)
    return WorldRecord(rid, category, scene, text, text, tuple(make_questions(scene, rid, rng)))


def make_records(n: int, seed: int, split: str = "train") -> list[WorldRecord]:
    """``n`` records of a split, deterministic in (seed, split)."""
    if n < 0:
        raise ValueError(f"make_records: n must be ≥ 0, got {n}")
    return [make_record(seed, split, i) for i in range(n)]


def write_records(path: str | os.PathLike, records: list[WorldRecord], images_dir: str | os.PathLike) -> Path:
    """Write the PNGs (``images_dir/{id}.png``) and the JSONL (atomically: a temp file renamed); returns the path."""
    path, images_dir = Path(path), Path(images_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            png = images_dir / f"{r.id}.png"
            Image.fromarray(r.render()).save(png)
            row = {"id": r.id, "category": r.category, "caption": r.caption, "prompt": r.prompt,
                   "image": Path(os.path.relpath(png.resolve(), path.parent.resolve())).as_posix(),
                   "questions": [q.to_dict() for q in r.questions], "scene": r.scene.to_dict()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


_FIELDS = ("id", "category", "caption", "prompt", "image", "questions", "scene")


def _record(row: object, root: Path) -> WorldRecord:
    if not isinstance(row, dict):
        raise ValueError(f"a record must be a JSON object, got {type(row).__name__}")
    missing = [k for k in _FIELDS if k not in row]
    if missing:
        raise ValueError(f"record {row.get('id')!r}: missing field(s) {missing}")
    rid = str(row["id"])
    try:
        scene = Scene.from_dict(row["scene"])
        questions = tuple(Question.from_dict(q) for q in row["questions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"record {rid!r}: bad scene or questions ({type(exc).__name__}: {exc})") from exc
    if row["category"] not in CATEGORIES:
        raise ValueError(f"record {rid!r}: category {row['category']!r} is not one of {CATEGORIES}")
    for key in ("caption", "prompt", "image"):
        if not isinstance(row[key], str) or not row[key]:
            raise ValueError(f"record {rid!r}: {key} must be a non-empty string, got {row[key]!r}")
    if parse_caption(row["caption"]) is None:
        raise ValueError(f"record {rid!r}: caption {row['caption']!r} is not a caption of the world's grammar")
    image = Path(row["image"])
    return WorldRecord(rid, row["category"], scene, row["caption"], row["prompt"], questions,
                       image if image.is_absolute() else (root / image).resolve())


def read_records(path: str | os.PathLike) -> list[WorldRecord]:
    """The records of a JSONL file written by ``write_records``; ValueError naming file:line on a bad line or a
    repeated id, FileNotFoundError if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_records: {path} does not exist")
    out, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = _record(json.loads(line), path.parent)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from exc
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from exc
            if rec.id in seen:
                raise ValueError(f"{path}:{lineno}: id {rec.id!r} repeats line {seen[rec.id]}")
            seen[rec.id] = lineno
            out.append(rec)
    return out
