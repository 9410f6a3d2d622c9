"""Captions of the shapes world: the grammar round-trips (caption → parse → the same facts and the same caption),
the parser forgives decoding debris and refuses the rest, and the scores: exact attribute agreement of a caption
with the true scene, and exact answer matching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hermesflow_fast.world.grammar import caption, parse_caption
from hermesflow_fast.world.scene import CATEGORIES, COLOURS, RELATIONS, SHAPES, compose, sample_scene
from hermesflow_fast.world.scoring import answer_match, caption_agreement, normalise_answer, scene_facts


def _scenes(seed: int = 0, n: int = 600):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(n)]


def _every_caption() -> list[str]:
    out = []
    for s, c in itertools.product(SHAPES, COLOURS):
        out.append(caption(compose([(s, c)])))
        out += [caption(compose([(s, c)] * n)) for n in (2, 3)]
    for (s0, c0), (s1, c1) in itertools.permutations(itertools.product(SHAPES, COLOURS), 2):
        if s0 != s1:
            out += [caption(compose([(s0, c0), (s1, c1)], r)) for r in (None, *RELATIONS)]
    return out


def test_examples():
    assert caption(compose([("circle", "red")])) == "a red circle"
    assert caption(compose([("square", "blue"), ("triangle", "green")], "left")) == \
        "a blue square to the left of a green triangle"
    assert caption(compose([("circle", "yellow")] * 2)) == "two yellow circles"
    assert caption(compose([("square", "red"), ("circle", "blue")], "above")) == "a red square above a blue circle"
    assert caption(compose([("square", "red"), ("circle", "blue")])) == "a red square and a blue circle"


def test_round_trip_of_sampled_scenes():
    for scene in _scenes():
        text = caption(scene)
        parsed = parse_caption(text)
        assert parsed is not None, text
        assert scene_facts(parsed) == scene_facts(scene), text
        assert caption(parsed) == text
        assert parsed.kind == scene.kind and parsed.relation == scene.relation


def test_round_trip_of_every_caption():
    captions = _every_caption()
    # 12 singles, 24 counts, 96 ordered pairs of different shapes (same colour allowed) × 5 joints
    assert len(captions) == len(set(captions)) == 12 + 24 + 96 * 5
    for text in captions:
        assert caption(parse_caption(text)) == text


def test_parse_forgives_decoding_debris():
    assert caption(parse_caption("  A Red  Circle.<|endoftext|>")) == "a red circle"
    assert caption(parse_caption(" two blue squares .")) == "two blue squares"


@pytest.mark.parametrize("text", ["", "a red", "a purple circle", "a red circle and", "one red circle",
                                  "four red circles", "a red circle and a blue circle", "a red circle left of a "
                                  "blue square", "red circle", "a red circle a blue square", None, 3])
def test_parse_refuses_the_rest(text):
    assert parse_caption(text) is None


def test_caption_agreement():
    red_circle = compose([("circle", "red")])
    assert caption_agreement("a red circle", red_circle) == 1.0
    assert caption_agreement("a blue circle", red_circle) == 0.5  # 2 of 3 facts, 1 false fact added
    assert caption_agreement("a blue square", red_circle) == 0.0
    assert caption_agreement("two red circles", red_circle) == pytest.approx(2 / 4)
    assert caption_agreement("a red circle and a blue square", red_circle) == pytest.approx(3 / 6)
    assert caption_agreement("the image shows a circle", red_circle) == 0.0

    pair = compose([("square", "blue"), ("triangle", "green")], "left")
    assert caption_agreement("a blue square to the left of a green triangle", pair) == 1.0
    assert caption_agreement("a green triangle to the right of a blue square", pair) == 1.0  # same facts
    assert caption_agreement("a blue square and a green triangle", pair) == pytest.approx(6 / 7)
    assert caption_agreement("a blue square above a green triangle", pair) == pytest.approx(6 / 8)

    unstated = compose([("square", "blue"), ("triangle", "green")])  # left/right, relation not stated
    assert caption_agreement("a blue square to the left of a green triangle", unstated) == 1.0  # true extra fact
    assert caption_agreement("a blue square to the right of a green triangle", unstated) == pytest.approx(6 / 7)


def test_caption_agreement_is_in_unit_interval_and_one_only_for_the_truth():
    scenes = _scenes(1, 120)
    texts = [caption(s) for s in scenes]
    for scene in scenes[:40]:
        for text in texts:
            a = caption_agreement(text, scene)
            assert 0.0 <= a <= 1.0
            if scene_facts(parse_caption(text)) == scene_facts(scene):
                assert a == 1.0


def test_answer_match():
    colours = ("red", "green", "blue", "yellow")
    assert answer_match("red", colours) == "red"
    assert answer_match(" Red.<|endoftext|>", colours) == "red"
    assert answer_match("the blue", colours) == "blue"
    assert answer_match("reddish", colours) is None
    assert answer_match("red and blue", colours) is None
    assert answer_match("2", ("one", "two", "three")) == "two"
    assert answer_match("", ("yes", "no")) is None
    assert normalise_answer("  Left!! ") == "left"
