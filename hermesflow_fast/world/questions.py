"""TIFA-style multiple-choice questions about a scene, in GenEval's categories, and their parser.

A record's questions check exactly what its caption states (TIFA derives them from the caption), so they
are fair questions both about the real image (understanding score) and about an image generated from the caption
(generation score, the paper's Table 4 protocol). Answers are single words of the world's vocabulary.

    category       text                                              choices                 scenes
    single_object  what shape is in the image?                       circle/square/triangle  single, count
    two_object     is there a {shape}?   (both shapes, + the absent)  yes/no                  pair
    counting       how many shapes are there?                        one/two/three           single, pair
                   how many {shape}s are there?                      one/two/three           count
    colors         what colour is the {shape}? / are the {shape}s?   the four colours        single, count
    position       is the {c} {s} left or right of the {c} {s}?      left/right              pair with a relation
                   is the {c} {s} above or below the {c} {s}?        above/below
    color_attr     what colour is the {shape}?                       the four colours        pair

A position question asks about the caption's first object or, by a draw from ``rng``, the second (with the inverse
relation). ``parse_question(text)`` turns a text back into a ``QuestionForm`` (what the judge needs to answer it)
and raises ValueError on a text that is not one of these templates. ``Question.prompt`` is the self-VQA prompt:
the text followed by "choices: a, b, c".

    python -m pytest -q tests/world/test_world_records.py
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hermesflow_fast.world.grammar import NUMBER_WORDS, plural
from hermesflow_fast.world.scene import CATEGORIES, COLOURS, INVERSE, SHAPES, Scene

__all__ = ["COUNT_CHOICES", "QUESTION_CATEGORIES", "Question", "QuestionForm", "make_questions", "parse_question",
           "question_prompt"]

QUESTION_CATEGORIES = CATEGORIES  # GenEval's six, in its order
COUNT_CHOICES = ("one", "two", "three")
YES_NO = ("yes", "no")
_S = "|".join(SHAPES)
_C = "|".join(COLOURS)
_TEMPLATES = [
    ("shape", re.compile(r"what shape is in the image\?")),
    ("exists", re.compile(rf"is there a ({_S})\?")),
    ("count", re.compile(r"how many shapes are there\?")),
    ("count", re.compile(rf"how many ({_S})s are there\?")),
    ("colour", re.compile(rf"what colour is the ({_S})\?")),
    ("colour", re.compile(rf"what colour are the ({_S})s\?")),
    ("relation", re.compile(rf"is the ({_C}) ({_S}) (left or right of|above or below) the ({_C}) ({_S})\?")),
]


def question_prompt(text: str, choices: Sequence[str]) -> str:
    """The self-VQA question put to the model: "{text} choices: {c1}, {c2}, …" (world and real-data questions)."""
    return f"{text} choices: {', '.join(choices)}"


@dataclass(frozen=True)
class Question:
    id: str
    category: str  # one of QUESTION_CATEGORIES
    text: str
    choices: tuple[str, ...]
    answer: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.category not in QUESTION_CATEGORIES:
            raise ValueError(f"Question {self.id}: category {self.category!r} is not one of {QUESTION_CATEGORIES}")
        if self.answer not in self.choices:
            raise ValueError(f"Question {self.id}: answer {self.answer!r} is not among its choices {self.choices}")

    @property
    def prompt(self) -> str:
        """The self-VQA question put to the model: :func:`question_prompt`."""
        return question_prompt(self.text, self.choices)

    def to_dict(self) -> dict:
        return {"id": self.id, "category": self.category, "text": self.text, "choices": list(self.choices),
                "answer": self.answer}

    @classmethod
    def from_dict(cls, d: dict) -> Question:
        return cls(id=str(d["id"]), category=d["category"], text=d["text"], choices=tuple(d["choices"]),
                   answer=d["answer"])


@dataclass(frozen=True)
class QuestionForm:
    """What a question asks: ``kind`` ∈ shape / exists / count / colour / relation; ``shape`` the shape asked about
    (None = any); for a relation, ``colour`` and ``shape`` of the subject, ``other`` = (colour, shape) of the
    reference, ``axis`` "horizontal" (left/right) or "vertical" (above/below)."""

    kind: str
    shape: str | None = None
    colour: str | None = None
    other: tuple[str, str] | None = None
    axis: str | None = None


def parse_question(text: str) -> QuestionForm:
    """The form of a question text of the templates above; ValueError naming the text otherwise."""
    norm = " ".join(str(text).strip().lower().split())
    for kind, pattern in _TEMPLATES:
        m = pattern.fullmatch(norm)
        if m is None:
            continue
        if kind == "relation":
            axis = "horizontal" if m[3] == "left or right of" else "vertical"
            return QuestionForm(kind, shape=m[2], colour=m[1], other=(m[4], m[5]), axis=axis)
        return QuestionForm(kind, shape=m[1] if m.groups() else None)
    raise ValueError(f"parse_question: {text!r} is not a question of the shapes world")


def make_questions(scene: Scene, record_id: str, rng: np.random.Generator) -> list[Question]:
    """The questions of a scene's stated facts (see the table above), ids "{record_id}-q{k}"."""
    out: list[tuple[str, str, tuple[str, ...], str]] = []
    objs = scene.objects
    first = objs[0]
    if scene.kind == "single":
        out.append(("single_object", "what shape is in the image?", SHAPES, first.shape))
        out.append(("colors", f"what colour is the {first.shape}?", COLOURS, first.colour))
        out.append(("counting", "how many shapes are there?", COUNT_CHOICES, "one"))
    elif scene.kind == "count":
        out.append(("single_object", "what shape is in the image?", SHAPES, first.shape))
        out.append(("colors", f"what colour are the {plural(first.shape)}?", COLOURS, first.colour))
        out.append(("counting", f"how many {plural(first.shape)} are there?", COUNT_CHOICES,
                    NUMBER_WORDS[len(objs)]))
    else:
        a, b = objs
        absent = next(s for s in SHAPES if s not in (a.shape, b.shape))
        out.append(("two_object", f"is there a {a.shape}?", YES_NO, "yes"))
        out.append(("two_object", f"is there a {b.shape}?", YES_NO, "yes"))
        out.append(("two_object", f"is there a {absent}?", YES_NO, "no"))
        out.append(("counting", "how many shapes are there?", COUNT_CHOICES, "two"))
        out.append(("color_attr", f"what colour is the {a.shape}?", COLOURS, a.colour))
        out.append(("color_attr", f"what colour is the {b.shape}?", COLOURS, b.colour))
        if scene.relation is not None:
            subject, reference, relation = a, b, scene.relation
            if rng.integers(2):
                subject, reference, relation = b, a, INVERSE[relation]
            pair, ask = (("left", "right"), "left or right of") if relation in ("left", "right") else \
                (("above", "below"), "above or below")
            out.append(("position", f"is the {subject.colour} {subject.shape} {ask} the {reference.colour} "
                                    f"{reference.shape}?", pair, relation))
    return [Question(f"{record_id}-q{k}", cat, text, choices, answer)
            for k, (cat, text, choices, answer) in enumerate(out)]
