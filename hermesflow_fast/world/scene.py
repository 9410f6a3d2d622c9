"""The shapes world's scenes: what a picture holds (1–3 coloured shapes and where they sit), how it is drawn, and the
seeded sampler of GenEval-like scenes.

A ``Scene`` is one of three kinds, all on a 32×32 canvas (``CANVAS``; coordinates are canvas pixels, x = column to
the right, y = row downwards, an object's (x, y) is the centre of its ``size``×``size`` box):

    single   one object                                     "a red circle"
    pair     two objects of different shapes, side by side  "a blue square to the left of a green triangle"
             (left/right) or stacked (above/below)          "a blue square and a green triangle"
    count    2–3 identical objects in 2–3 of the quadrants  "three yellow circles"

``relation`` is the relation of ``objects[0]`` to ``objects[1]`` that the caption states ("left", "right", "above",
"below"), or None when the caption states none; the geometry always has one (``relation_of``).

Objects are 8, 10 or 12 px, inside their half or quadrant of the canvas with a margin of at least 1 px, so two
objects never touch (≥ 2 px apart). ``render`` draws on black with no anti-aliasing (a pixel is the object's colour
iff its centre lies inside the shape), which keeps edges crisp for the judge; ``size`` is 32 or a multiple of it (the
canvas scaled by a whole number, so shapes keep their pixel-exact form).
The palette is four saturated, well-separated colours. Triangles point up (apex at the top centre of the box).

``sample_scene(rng, category)`` draws a scene for one of GenEval's six categories (``CATEGORIES``): single_object
and colors → single; two_object and color_attr → pair with no stated relation; position → pair with a stated
relation; counting → count. Pairs use two different colours. Everything comes from the ``numpy.random.Generator``
passed in, so the same seed gives the same scenes in every process.

    python -m pytest -q tests/world/test_scene.py
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUND",
    "CANVAS",
    "CATEGORIES",
    "COLOURS",
    "OBJECT_SIZES",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "compose",
    "relation_of",
    "render",
    "sample_scene",
]

CANVAS = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 210, 40),
}
BACKGROUND = (0, 0, 0)
RELATIONS = ("left", "right", "above", "below")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
OBJECT_SIZES = (8, 10, 12)
_CANONICAL_SIZE = 10
_QUADRANTS = ((0, 0), (16, 0), (0, 16), (16, 16))  # (x0, y0) of each 16×16 cell, reading order


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: float  # centre column, canvas px
    y: float  # centre row, canvas px
    size: float  # side of the bounding box, canvas px

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"SceneObject: shape {self.shape!r} is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"SceneObject: colour {self.colour!r} is not one of {COLOURS}")
        if not self.size > 0:
            raise ValueError(f"SceneObject: size must be > 0, got {self.size}")

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "x": self.x, "y": self.y, "size": self.size}


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relation: str | None = None  # stated relation of objects[0] to objects[1]; None = not stated

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        n = len(self.objects)
        if not 1 <= n <= 3:
            raise ValueError(f"Scene: 1 to 3 objects, got {n}")
        kinds = {(o.shape, o.colour) for o in self.objects}
        if n == 2 and len({o.shape for o in self.objects}) == 2:
            pass  # a pair
        elif n > 1 and len(kinds) != 1:
            raise ValueError(f"Scene: {n} objects must be 2 of different shapes (a pair) or 2–3 identical ones "
                             f"(a count), got {sorted(kinds)}")
        if self.relation is not None:
            if self.kind != "pair":
                raise ValueError(f"Scene: a relation ({self.relation!r}) needs a pair, this scene is a {self.kind}")
            if self.relation not in RELATIONS:
                raise ValueError(f"Scene: relation {self.relation!r} is not one of {RELATIONS}")

    @property
    def kind(self) -> str:
        """"single", "pair" or "count"."""
        if len(self.objects) == 1:
            return "single"
        return "pair" if self.objects[0].shape != self.objects[1].shape else "count"

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Inverse of ``to_dict``; KeyError/TypeError/ValueError on a malformed dict."""
        objects = tuple(SceneObject(shape=o["shape"], colour=o["colour"], x=float(o["x"]), y=float(o["y"]),
                                    size=float(o["size"])) for o in d["objects"])
        return cls(objects=objects, relation=d.get("relation"))


def relation_of(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is with respect to ``b`` along the axis on which they are farther apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


# ---------------------------------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------------------------------


def _centre(rng: np.random.Generator | None, lo: float, hi: float, size: int) -> float:
    """A centre for an object of ``size`` inside [lo, hi) with ≥ 1 px margin: uniform integer, or the middle."""
    a, b = lo + 1 + size / 2, hi - 1 - size / 2
    if rng is None:
        return (lo + hi) / 2
    return float(rng.integers(int(np.ceil(a)), int(np.floor(b)) + 1))


def _size(rng: np.random.Generator | None) -> int:
    return _CANONICAL_SIZE if rng is None else int(rng.choice(OBJECT_SIZES))


def compose(items: Sequence[tuple[str, str]], relation: str | None = None, *, vertical: bool | None = None,
            rng: np.random.Generator | None = None) -> Scene:
    """A scene of ``items`` = [(shape, colour), …] placed on the canvas: jittered sizes and positions drawn from
    ``rng``, or a canonical layout (size 10, centred in its cell) when ``rng`` is None.

    One item: near the centre. Two different shapes: a pair in the left/right halves (or top/bottom when
    ``vertical``, or when ``relation`` is above/below), ``items[0]`` on the side ``relation`` says (first side when
    None). 2–3 identical items: a count, in 2–3 of the four quadrants (the first ones when ``rng`` is None)."""
    items = [(str(s), str(c)) for s, c in items]
    if len(items) == 1:
        (shape, colour), size = items[0], _size(rng)
        jitter = (0.0, 0.0) if rng is None else tuple(float(v) for v in rng.integers(-4, 5, size=2))
        return Scene((SceneObject(shape, colour, CANVAS / 2 + jitter[0], CANVAS / 2 + jitter[1], size),))
    if len(items) == 2 and items[0][0] != items[1][0]:
        if relation is not None:
            vertical = relation in ("above", "below")
        elif vertical is None:
            vertical = bool(rng.integers(2)) if rng is not None else False
        first_at_start = relation in (None, "left", "above")
        half = CANVAS / 2
        objects = []
        for k, (shape, colour) in enumerate(items):
            size = _size(rng)
            lo = 0.0 if (k == 0) == first_at_start else half
            along = _centre(rng, lo, lo + half, size)
            across = CANVAS / 2 if rng is None else CANVAS / 2 + float(rng.integers(-4, 5))
            x, y = (across, along) if vertical else (along, across)
            objects.append(SceneObject(shape, colour, x, y, size))
        return Scene(tuple(objects), relation)
    if 2 <= len(items) <= 3 and len(set(items)) == 1:
        if relation is not None:
            raise ValueError(f"compose: a count of identical objects has no relation, got {relation!r}")
        n = len(items)
        cells = list(range(n)) if rng is None else sorted(int(i) for i in rng.choice(4, size=n, replace=False))
        size = _size(rng)  # identical objects: one size
        shape, colour = items[0]
        objects = []
        for c in cells:
            x0, y0 = _QUADRANTS[c]
            objects.append(SceneObject(shape, colour, _centre(rng, x0, x0 + 16, size), _centre(rng, y0, y0 + 16, size),
                                       size))
        return Scene(tuple(objects))
    raise ValueError(f"compose: {items} is not a scene of this world (one object, two different shapes, or 2–3 "
                     f"identical objects)")


def sample_scene(rng: np.random.Generator, category: str) -> Scene:
    """A random scene for a GenEval category (``CATEGORIES``), drawn from ``rng`` only."""
    if category not in CATEGORIES:
        raise ValueError(f"sample_scene: category {category!r} is not one of {CATEGORIES}")
    if category in ("single_object", "colors"):
        return compose([(SHAPES[rng.integers(3)], COLOURS[rng.integers(4)])], rng=rng)
    if category == "counting":
        item = (SHAPES[rng.integers(3)], COLOURS[rng.integers(4)])
        return compose([item] * int(rng.integers(2, 4)), rng=rng)
    shapes = rng.choice(len(SHAPES), size=2, replace=False)
    colours = rng.choice(len(COLOURS), size=2, replace=False)
    items = [(SHAPES[shapes[0]], COLOURS[colours[0]]), (SHAPES[shapes[1]], COLOURS[colours[1]])]
    relation = RELATIONS[rng.integers(4)] if category == "position" else None
    return compose(items, relation, rng=rng)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------


def _mask(o: SceneObject, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(size, size) bool: pixel centres (u = column, v = row, canvas units) inside the object."""
    r = o.size / 2
    if o.shape == "square":
        return (np.abs(u - o.x) < r) & (np.abs(v - o.y) < r)
    if o.shape == "circle":
        return (u - o.x) ** 2 + (v - o.y) ** 2 < r * r
    depth = v - (o.y - r)  # distance below the apex; the width grows from 0 at the apex to size at the base
    return (depth > 0) & (v < o.y + r) & (np.abs(u - o.x) < depth / 2)


def render(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """The scene as a uint8 RGB image (size, size, 3): black background, palette colours, no anti-aliasing; ``size``
    a multiple of 32."""
    if not isinstance(size, (int, np.integer)) or size < CANVAS or size % CANVAS:
        raise ValueError(f"render: size must be a positive multiple of {CANVAS} (pixel-exact shapes), got {size!r}")
    scale = size / CANVAS
    centres = (np.arange(size, dtype=np.float64) + 0.5) / scale
    u, v = np.meshgrid(centres, centres)  # (size, size): u = column centre, v = row centre
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for o in scene.objects:
        image[_mask(o, u, v)] = PALETTE[o.colour]
    return image
