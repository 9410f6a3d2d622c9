"""Scoring text against the shapes world: a candidate caption against the true scene (the understanding side's
score s(y_k, y) of the paper's §3.6, exact instead of BERT-CLS cosine), and a free-form answer against a
question's choices (the paper's self-VQA mapping, §3.5, exact instead of SBERT).

Facts of a scene, as its caption states them (shapes are unique within a world scene, so they key the facts):

    ("shape", s)              there is a s
    ("colour", s, c)          the s is (the s's are) c
    ("count", s, n)           there are n s's (n = 1 for "a")
    ("relation", s, r, t)     the s is r of the t, r ∈ {left, above} (right/below are stored flipped)

``caption_agreement(candidate, truth)`` = |T ∩ C| / (|T| + |W|): T the truth's stated facts, C the candidate's, W
the candidate's facts outside T that are false of the true scene (a relation the truth's caption leaves unstated
but its geometry shows is not false, and costs nothing). 1.0 for a caption stating exactly the truth, 0.0 for an
unparseable one; a wrong colour both misses a fact and adds a false one ("a blue circle" for a red circle: 2/4).

``answer_match(answer, choices)``: the choice equal to the answer after normalisation (lower case, an
<|endoftext|>, punctuation and a leading "a"/"an"/"the" dropped, whitespace collapsed, digits 0–5 as words), else None.

    python -m pytest -q tests/world/test_grammar.py
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hermesflow_fast.world.grammar import NUMBER_WORDS, parse_caption
from hermesflow_fast.world.scene import INVERSE, Scene, relation_of

__all__ = ["answer_match", "caption_agreement", "normalise_answer", "scene_facts"]

Fact = tuple


def _relation_fact(s: str, relation: str, t: str) -> Fact:
    if relation in ("right", "below"):
        return ("relation", t, INVERSE[relation], s)
    return ("relation", s, relation, t)


def scene_facts(scene: Scene) -> frozenset[Fact]:
    """The facts the scene's caption states (see the module docstring)."""
    facts: set[Fact] = set()
    for o in scene.objects:
        n = sum(1 for p in scene.objects if p.shape == o.shape)
        facts |= {("shape", o.shape), ("colour", o.shape, o.colour), ("count", o.shape, n)}
    if scene.relation is not None:
        a, b = scene.objects
        facts.add(_relation_fact(a.shape, scene.relation, b.shape))
    return frozenset(facts)


def _true_of(fact: Fact, scene: Scene) -> bool:
    """Whether a fact holds in the scene, its geometry included."""
    if fact[0] == "relation":
        _, s, relation, t = fact
        a = next((o for o in scene.objects if o.shape == s), None)
        b = next((o for o in scene.objects if o.shape == t), None)
        return a is not None and b is not None and a is not b and relation_of(a, b) == relation
    return fact in scene_facts(scene)


def caption_agreement(candidate_caption: str, true_scene: Scene) -> float:
    """Exact attribute agreement of a caption with the true scene, in [0, 1] (0.0 if the caption does not parse)."""
    parsed = parse_caption(candidate_caption)
    if parsed is None:
        return 0.0
    truth, cand = scene_facts(true_scene), scene_facts(parsed)
    wrong = sum(1 for f in cand - truth if not _true_of(f, true_scene))
    return len(truth & cand) / (len(truth) + wrong)


_PUNCT = re.compile(r"[^\w\s]")
_ARTICLE = re.compile(r"^(a|an|the)\s+")


def normalise_answer(text: str) -> str:
    text = str(text).replace("<|endoftext|>", " ").lower()
    text = " ".join(_PUNCT.sub(" ", text).split())
    text = _ARTICLE.sub("", text)
    if text.isdigit() and int(text) < len(NUMBER_WORDS):
        text = NUMBER_WORDS[int(text)]
    return text


def answer_match(free_form_answer: str, choices: Sequence[str]) -> str | None:
    """The choice the answer names exactly after normalisation, or None."""
    norm = normalise_answer(free_form_answer)
    for choice in choices:
        if normalise_answer(choice) == norm:
            return choice
    return None
