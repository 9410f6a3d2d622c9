"""Scenes of the shapes world: seeded sampling identical across calls and processes, one object per grid cell with
identical objects never sharing an edge, stated relations that match the geometry, crisp palette-only rendering,
clear errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from hermesflow_fast.world.scene import (
    BACKGROUND,
    CANVAS,
    CATEGORIES,
    CELL,
    OBJECT_SIZE,
    PALETTE,
    Scene,
    SceneObject,
    cell_of,
    compose,
    relation_of,
    render,
    sample_scene,
)


def _scenes(seed: int, n: int = 300) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(n)]


def _digest(scenes: list[Scene]) -> str:
    h = hashlib.sha256()
    for s in scenes:
        h.update(repr(s.to_dict()).encode())
        h.update(render(s).tobytes())
    return h.hexdigest()


def test_sampling_is_deterministic_in_the_seed():
    assert _scenes(3) == _scenes(3)
    assert _scenes(3) != _scenes(4)


def test_sampling_is_identical_in_another_process():
    code = ("import hashlib, numpy as np\n"
            "from hermesflow_fast.world.scene import CATEGORIES, render, sample_scene\n"
            "rng = np.random.default_rng(3); h = hashlib.sha256()\n"
            "for i in range(300):\n"
            "    s = sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])\n"
            "    h.update(repr(s.to_dict()).encode()); h.update(render(s).tobytes())\n"
            "print(h.hexdigest())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == _digest(_scenes(3))


def test_categories_give_their_kinds():
    rng = np.random.default_rng(0)
    kinds = {"single_object": "single", "colors": "single", "counting": "count", "two_object": "pair",
             "color_attr": "pair", "position": "pair"}
    for _ in range(20):
        for category, kind in kinds.items():
            s = sample_scene(rng, category)
            assert s.kind == kind
            assert (s.relation is not None) == (category == "position")
            if kind == "pair":
                assert s.objects[0].colour != s.objects[1].colour
            if kind == "count":
                assert 2 <= len(s.objects) <= 3


def _masks(scene: Scene) -> list[np.ndarray]:
    return [render(Scene((o,))).any(axis=-1) for o in scene.objects]


def test_one_object_per_cell_and_identical_objects_never_touch():
    for s in _scenes(1, 600):
        cells = [cell_of(o) for o in s.objects]
        assert len(set(cells)) == len(cells), s
        for o, m, (c, r) in zip(s.objects, _masks(s), cells):
            assert o.size == OBJECT_SIZE and (o.x, o.y) == (CELL * c + CELL / 2, CELL * r + CELL / 2)
            rows, cols = np.nonzero(m)  # drawn inside its own cell
            assert rows.min() >= CELL * r and rows.max() < CELL * (r + 1)
            assert cols.min() >= CELL * c and cols.max() < CELL * (c + 1)
        if s.kind == "count":  # same colour: cells sharing an edge would draw one blob
            for i, a in enumerate(cells):
                for b in cells[i + 1:]:
                    assert abs(a[0] - b[0]) + abs(a[1] - b[1]) > 1, s


def test_stated_relation_matches_the_geometry():
    n = 0
    for s in _scenes(2, 600):
        if s.relation is not None:
            a, b = s.objects
            assert relation_of(a, b) == s.relation
            n += 1
    assert n > 50


def test_render_is_crisp_and_palette_only():
    allowed = {BACKGROUND, *PALETTE.values()}
    for s in _scenes(5, 60):
        img = render(s)
        assert img.shape == (CANVAS, CANVAS, 3) and img.dtype == np.uint8
        assert {tuple(int(v) for v in p) for p in img.reshape(-1, 3)} <= allowed
        big = render(s, 64)
        assert big.shape == (64, 64, 3)
        for o, m in zip(s.objects, _masks(s)):  # each object is drawn in its own colour
            assert (img[m] == PALETTE[o.colour]).all()


def test_shapes_render_with_their_areas():
    areas = {shape: render(compose([(shape, "red")])).any(-1).sum() for shape in ("circle", "square", "triangle")}
    assert areas["square"] == 64 and 44 <= areas["circle"] <= 56 and 24 <= areas["triangle"] <= 40


def test_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        SceneObject("hexagon", "red", 16, 16, 10)
    with pytest.raises(ValueError, match="colour"):
        SceneObject("circle", "purple", 16, 16, 10)
    red, blue = SceneObject("circle", "red", 8, 16, 10), SceneObject("circle", "blue", 24, 16, 10)
    with pytest.raises(ValueError, match="different shapes"):
        Scene((red, blue))
    with pytest.raises(ValueError, match="needs a pair"):
        Scene((red,), relation="left")
    with pytest.raises(ValueError, match="category"):
        sample_scene(np.random.default_rng(0), "texture")
    with pytest.raises(ValueError, match="multiple of 32"):
        render(Scene((red,)), 40)
    with pytest.raises(ValueError, match="not a scene"):
        compose([("circle", "red")] * 4)


def test_scene_dict_round_trip():
    for s in _scenes(6, 60):
        assert Scene.from_dict(s.to_dict()) == s
