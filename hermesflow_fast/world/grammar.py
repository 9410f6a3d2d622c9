"""The caption grammar of the shapes world: a scene's caption (which is also its t2i prompt) and the parser back.

    caption   := object                                   "a red circle"
               | object " and " object                     "a red circle and a blue square"
               | object " " relation " " object            "a blue square to the left of a green triangle"
               | number " " colour " " shape "s"           "two yellow circles"
    object    := "a " colour " " shape
    relation  := "to the left of" | "to the right of" | "above" | "below"
    number    := "two" | "three"

``caption(scene)`` states what the scene's kind says: a pair's relation only when ``scene.relation`` is set.
``parse_caption(text)`` reads a caption back into a ``Scene`` with the canonical layout (``compose`` without rng),
so captions round-trip: ``caption(parse_caption(c)) == c``. It forgives what a decoded model caption carries (case,
surrounding or repeated whitespace, a final "." or an <|endoftext|>) and returns None for anything else, including
two objects of the same shape ("a red circle and a blue circle": the world's questions could not tell them apart).

    python -m pytest -q tests/world/test_grammar.py
"""

from __future__ import annotations

import re

from hermesflow_fast.world.scene import COLOURS, SHAPES, Scene, compose

__all__ = ["NUMBER_WORDS", "RELATION_PHRASES", "caption", "parse_caption", "plural"]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_PHRASE_RELATION = {v: k for k, v in RELATION_PHRASES.items()}
_OBJECT = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_SINGLE = re.compile(rf"{_OBJECT}")
_AND = re.compile(rf"{_OBJECT} and {_OBJECT}")
_RELATION = re.compile(rf"{_OBJECT} ({'|'.join(RELATION_PHRASES.values())}) {_OBJECT}")
_COUNT = re.compile(rf"(two|three) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s")


def plural(shape: str) -> str:
    return shape + "s"


def _object(shape: str, colour: str) -> str:
    return f"a {colour} {shape}"


def caption(scene: Scene) -> str:
    """The caption of ``scene`` (its t2i prompt too)."""
    objs = scene.objects
    if scene.kind == "single":
        return _object(objs[0].shape, objs[0].colour)
    if scene.kind == "count":
        return f"{NUMBER_WORDS[len(objs)]} {objs[0].colour} {plural(objs[0].shape)}"
    joint = "and" if scene.relation is None else RELATION_PHRASES[scene.relation]
    return f"{_object(objs[0].shape, objs[0].colour)} {joint} {_object(objs[1].shape, objs[1].colour)}"


def _normalise(text: str) -> str:
    text = text.replace("<|endoftext|>", " ").strip().lower()
    text = re.sub(r"\s*\.$", "", text)
    return " ".join(text.split())


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of the grammar describes (canonical layout), or None if it is not one."""
    if not isinstance(text, str):
        return None
    text = _normalise(text)
    if m := _SINGLE.fullmatch(text):
        return compose([(m[2], m[1])])
    if m := _COUNT.fullmatch(text):
        return compose([(m[3], m[2])] * NUMBER_WORDS.index(m[1]))
    m, relation = _AND.fullmatch(text), None
    if m is None and (m := _RELATION.fullmatch(text)) is not None:
        relation = _PHRASE_RELATION[m[3]]
    if m is None:
        return None
    groups = [g for g in m.groups() if g not in _PHRASE_RELATION]
    (c0, s0), (c1, s1) = groups[:2], groups[2:]
    if s0 == s1:
        return None
    return compose([(s0, c0), (s1, c1)], relation)
