"""The shapes world's imperfect data: near-miss captions (as web alt-text is wrong) and perturbed images.

HermesFlow's premise is a model whose understanding is stronger than its generation, with generation misses that are
*alignment* misses: it can draw the right image but does not reliably follow the prompt, the state text-to-image
models are left in by pretraining on noisy web captions. The world's base is put there on purpose:

    near_miss(scene, rng)        the scene with ONE attribute wrong: a colour, a shape, the two colours swapped, the
                                 stated relation flipped, or the count ±1 (what a careless caption gets wrong);
                                 objects keep their cells where they still exist
    noisy_prompts(recs, rate, seed)  the t2i prompts of pretraining: exactly round(rate · n) records, chosen by a
                                 seeded permutation, get the caption of a near miss of their scene instead of their
                                 own (the image stays the true render): the generation side learns from noisy captions
    perturb(scene, rng)          the objects of an image that misses its caption: a near miss, an extra object in a
                                 free cell, or a missing object; the understanding side answers the record's questions
                                 about such images with the answers the judge reads off their renders (exact on
                                 renders), so self-VQA learns to look at the image, not to repeat the prompt

Everything is drawn from the generator passed in (or seeded from ``seed``), so the same seed gives the same data in
every process.

    python -m pytest -q tests/world/test_noise.py
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hermesflow_fast.world.grammar import caption
from hermesflow_fast.world.questions import COUNT_CHOICES
from hermesflow_fast.world.scene import (
    COLOURS,
    GRID,
    INVERSE,
    SHAPES,
    Scene,
    SceneObject,
    cell_centre,
    cell_of,
    compose,
)

__all__ = ["NEAR_MISS_KINDS", "near_miss", "noisy_prompts", "perturb", "probe_questions"]

NEAR_MISS_KINDS = ("colour", "shape", "swap", "relation", "count")


def _other(values: Sequence[str], *exclude: str, rng: np.random.Generator) -> str:
    rest = [v for v in values if v not in exclude]
    return rest[int(rng.integers(len(rest)))]


def _kinds(scene: Scene) -> list[str]:
    if scene.kind == "single":
        return ["colour", "shape"]
    if scene.kind == "count":
        return ["colour", "shape", "count"]
    return ["colour", "shape", "swap"] + (["relation"] if scene.relation is not None else [])


def _free_cells(objects: Sequence[SceneObject], identical_to: SceneObject | None = None) -> list[tuple[int, int]]:
    """Empty cells; with ``identical_to``, also none sharing an edge with an object drawn like it (they would merge)."""
    taken = {cell_of(o) for o in objects}
    like = [cell_of(o) for o in objects if identical_to is not None and (o.shape, o.colour) ==
            (identical_to.shape, identical_to.colour)]
    return [(c, r) for r in range(GRID) for c in range(GRID) if (c, r) not in taken
            and not any(abs(c - a) + abs(r - b) == 1 for a, b in like)]


def _at(shape: str, colour: str, cell: tuple[int, int], size: float) -> SceneObject:
    x, y = cell_centre(*cell)
    return SceneObject(shape, colour, x, y, size)


def near_miss(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with one attribute wrong (a kind of ``NEAR_MISS_KINDS`` that applies to it, drawn uniformly): a valid
    world scene whose caption differs from ``caption(scene)``."""
    objs = list(scene.objects)
    kind = _kinds(scene)[int(rng.integers(len(_kinds(scene))))]
    if kind == "relation":
        return Scene(tuple(objs), INVERSE[scene.relation])  # the caption states the other side
    if kind == "swap":
        a, b = objs
        return Scene((SceneObject(a.shape, b.colour, a.x, a.y, a.size), SceneObject(b.shape, a.colour, b.x, b.y,
                                                                                       b.size)), scene.relation)
    if kind == "count":  # three → two (one left out), two → three (one more where it cannot touch its twins)
        if len(objs) == 3:
            drop = int(rng.integers(3))
            return Scene(tuple(objs[:drop] + objs[drop + 1:]))
        free = _free_cells(objs, objs[0])
        if not free:
            return compose([(objs[0].shape, objs[0].colour)] * 3)
        cell = free[int(rng.integers(len(free)))]
        return Scene((*objs, _at(objs[0].shape, objs[0].colour, cell, objs[0].size)))
    if scene.kind == "pair":
        k = int(rng.integers(2))
        o, other = objs[k], objs[1 - k]
        if kind == "colour":
            new = SceneObject(o.shape, _other(COLOURS, o.colour, other.colour, rng=rng), o.x, o.y, o.size)
        else:
            new = SceneObject(_other(SHAPES, o.shape, other.shape, rng=rng), o.colour, o.x, o.y, o.size)
        objs[k] = new
        return Scene(tuple(objs), scene.relation)
    o = objs[0]  # single or count: every object changes alike
    colour = _other(COLOURS, o.colour, rng=rng) if kind == "colour" else o.colour
    shape = _other(SHAPES, o.shape, rng=rng) if kind == "shape" else o.shape
    return Scene(tuple(SceneObject(shape, colour, p.x, p.y, p.size) for p in objs), scene.relation)


def noisy_prompts(scenes: Sequence[Scene], rate: float, seed: int) -> tuple[list[str], list[bool]]:
    """(t2i prompt per scene, whether it is a near miss): exactly ``round(rate · n)`` scenes, picked by a permutation
    seeded with ``seed``, get the caption of a near miss of themselves; the rest their own caption."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noisy_prompts: rate must lie in [0, 1], got {rate}")
    n = len(scenes)
    rng = np.random.default_rng([int(seed), 0x4E4F495345])  # "NOISE"
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.permutation(n)[: int(round(rate * n))]] = True
    prompts = [caption(near_miss(s, rng)) if bad else caption(s) for s, bad in zip(scenes, noisy)]
    return prompts, noisy.tolist()


def perturb(scene: Scene, rng: np.random.Generator) -> list[SceneObject]:
    """The objects of an image that misses ``scene``'s caption: a near miss (two chances in four), an extra object of
    any shape and colour in a free cell, or one object left out (one chance each). Not always a valid world scene
    (three objects, two of one shape): render it with ``render_objects``."""
    objs = list(scene.objects)
    draw = int(rng.integers(4))
    if draw == 2:
        free = _free_cells(objs)
        if free:
            cell = free[int(rng.integers(len(free)))]
            return [*objs, _at(SHAPES[int(rng.integers(len(SHAPES)))], COLOURS[int(rng.integers(len(COLOURS)))],
                               cell, objs[0].size)]
    if draw == 3 and len(objs) > 1:
        drop = int(rng.integers(len(objs)))
        return objs[:drop] + objs[drop + 1:]
    miss = near_miss(scene, rng)
    if miss.relation != scene.relation:  # the image shows the other side: the two objects trade cells
        a, b = miss.objects
        return [SceneObject(a.shape, a.colour, b.x, b.y, a.size), SceneObject(b.shape, b.colour, a.x, a.y, b.size)]
    return list(miss.objects)


def probe_questions(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[tuple[str, tuple[str, ...]]]:
    """Extra (text, choices) questions about any image's objects, for understanding rows whose answers the judge
    reads off the render: how many shapes there are, and where one object is with respect to another (two objects
    that differ in shape or colour, along the axis on which their cells are strictly farther apart)."""
    out: list[tuple[str, tuple[str, ...]]] = [("how many shapes are there?", COUNT_CHOICES)]
    pairs = [(a, b) for a in objects for b in objects if (a.shape, a.colour) != (b.shape, b.colour)
             and abs(cell_of(a)[0] - cell_of(b)[0]) != abs(cell_of(a)[1] - cell_of(b)[1])]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        horizontal = abs(cell_of(a)[0] - cell_of(b)[0]) > abs(cell_of(a)[1] - cell_of(b)[1])
        ask, choices = (("left or right of", ("left", "right")) if horizontal else
                        ("above or below", ("above", "below")))
        out.append((f"is the {a.colour} {a.shape} {ask} the {b.colour} {b.shape}?", choices))
    return out
