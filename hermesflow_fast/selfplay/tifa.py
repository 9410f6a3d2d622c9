"""Self-VQA questions for real data, from a TIFA-format question file: a JSON array (TIFA's
``tifa_v1.0_question_answers.json``) or JSONL, one question per item, joined to the records by id.

    {"id": "<record id>", "question": "is there a dog?", "choices": ["yes", "no"], "answer": "yes",
     "element_type": "object", ...}                       (other keys, e.g. "caption" / "element", are ignored)

    questions = load_tifa_questions("tifa_questions.json", record_ids=[r.id for r in records])
    records = [CurationRecord(r.id, r.prompt, codes, questions[r.id], r.caption) for r in records]

Every problem is reported with the file, the line (JSONL) or item number (JSON array) and the id: a missing key,
choices that are not a non-empty list, an answer that is not among its choices, a question whose id matches no
record, a record with no question. ``strict=True`` raises on the first kind of problem with all its instances
counted; ``strict=False`` drops the bad questions and says how many and why.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from hermesflow_fast.io import read_jsonl
from hermesflow_fast.world.questions import question_prompt

__all__ = ["RealQuestion", "load_tifa_questions"]

_KEYS = ("id", "question", "choices", "answer")


@dataclass(frozen=True)
class RealQuestion:
    """A multiple-choice question about a record's image (the interface the world's Question has)."""

    id: str
    record_id: str
    category: str
    text: str
    choices: tuple[str, ...]
    answer: str

    @property
    def prompt(self) -> str:
        """The self-VQA question put to the model, worded as the world's (``question_prompt``)."""
        return question_prompt(self.text, self.choices)


def _items(path: Path) -> list[tuple[str, object]]:
    """(where, item) pairs: "line N" for JSONL, "item N" for a JSON array."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return [(f"item {i}", x) for i, x in enumerate(data)]
    return [(f"line {n}", x) for n, x in read_jsonl(path)]


def load_tifa_questions(path: str | os.PathLike, record_ids: Collection[str] | None = None, strict: bool = True,
                        log: Callable[[str], None] = print) -> dict[str, list[RealQuestion]]:
    """Questions per record id (see the module docstring). ``record_ids``: the records the questions must match
    (each needs at least one question); None accepts any id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} does not exist")
    problems: dict[str, list[str]] = defaultdict(list)
    out: dict[str, list[RealQuestion]] = defaultdict(list)
    known = None if record_ids is None else set(record_ids)
    for where, item in _items(path):
        if not isinstance(item, dict):
            problems["not an object"].append(f"{path}:{where}")
            continue
        rid = str(item.get("id", "?"))
        at = f"{path}:{where} (id {rid!r})"
        missing = [k for k in _KEYS if k not in item]
        if missing:
            problems[f"missing {', '.join(missing)}"].append(at)
            continue
        choices = item["choices"]
        if not isinstance(choices, list) or not choices:
            problems["choices not a non-empty list"].append(at)
            continue
        choices = tuple(str(c) for c in choices)
        if str(item["answer"]) not in choices:
            problems["answer not among its choices"].append(at)
            continue
        if known is not None and rid not in known:
            problems["id matches no record"].append(at)
            continue
        qid = f"{rid}/q{len(out[rid])}"
        category = str(item.get("element_type") or item.get("category") or "other")
        out[rid].append(RealQuestion(qid, rid, category, str(item["question"]), choices, str(item["answer"])))
    if known is not None:
        for rid in sorted(known - set(out)):
            problems["record without questions"].append(f"{path}: record {rid!r}")
    if problems:
        summary = "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in problems.items())
        if strict:
            raise ValueError(f"question file {path}: {summary}")
        counts = Counter({k: len(v) for k, v in problems.items()})
        log(f"question file {path}: kept {sum(map(len, out.values()))} questions for {len(out)} records; dropped: "
            + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return dict(out)
