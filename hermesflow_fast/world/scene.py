"""The shapes world's scenes: what a picture holds (1–3 coloured shapes and where they sit), how it is drawn, and the
seeded sampler of GenEval-like scenes.

A ``Scene`` is one of three kinds, all on a 32×32 canvas (``CANVAS``; coordinates are canvas pixels, x = column to
the right, y = row downwards, an object's (x, y) is the centre of its ``size``×``size`` box):

    single   one object                                     "a red circle"
    pair     two objects of different shapes                "a blue square to the left of a green triangle"
                                                            "a blue square and a green triangle"
    count    2–3 identical objects                          "three yellow circles"

The canvas is a 4×4 grid of 8-px cells (``GRID``, ``CELL``) and every object fills one cell (``OBJECT_SIZE`` = 8),
so an image tokenizer with 8-px patches sees one object per token: the world asks a model to put the right glyphs in
the right cells, and what it gets wrong is *which* glyphs and cells (a colour, a count, an extra object), the kind of
miss prompt alignment fixes, not blurred or fragmented drawing. Objects never share a cell, and identical objects
never sit in cells that share an edge (they would draw as one blob).

``relation`` is the relation of ``objects[0]`` to ``objects[1]`` that the caption states ("left", "right", "above",
"below"), or None when the caption states none; a stated relation holds along the axis on which the two cells are
strictly farther apart (never a diagonal tie), so ``relation_of`` of the geometry always gives it back.
``render`` draws on black with no anti-aliasing (a pixel is the object's colour iff its centre lies inside the
shape), which keeps edges crisp for the judge; ``size`` is 32 or a multiple of it (the canvas scaled by a whole
number, so shapes keep their pixel-exact form); ``render_objects`` draws any list of objects the same way.
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
    "CELL",
    "GRID",
    "OBJECT_SIZE",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "cell_centre",
    "cell_of",
    "compose",
    "relation_of",
    "render",
    "render_objects",
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
GRID = 4  # the canvas is a GRID × GRID grid of cells
CELL = CANVAS // GRID  # 8 px: one object fills one cell, one image token (8 px patches) holds one object
OBJECT_SIZE = CELL


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


def cell_centre(col: int, row: int) -> tuple[float, float]:
    """The canvas (x, y) of the centre of grid cell (col, row)."""
    return CELL * col + CELL / 2, CELL * row + CELL / 2


def cell_of(o: SceneObject) -> tuple[int, int]:
    """The grid cell (col, row) an object's centre lies in."""
    return min(GRID - 1, max(0, int(o.x // CELL))), min(GRID - 1, max(0, int(o.y // CELL)))


_CELLS = tuple((c, r) for r in range(GRID) for c in range(GRID))  # reading order


def _strict_relation(a: tuple[int, int], b: tuple[int, int]) -> str | None:
    """The relation of cell a to cell b when one axis is strictly farther apart than the other, else None."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _touching(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Cells sharing an edge: identical objects there would draw as one 4-connected blob."""
    return abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1


def _object(shape: str, colour: str, cell: tuple[int, int]) -> SceneObject:
    x, y = cell_centre(*cell)
    return SceneObject(shape, colour, x, y, OBJECT_SIZE)


def compose(items: Sequence[tuple[str, str]], relation: str | None = None, *, vertical: bool | None = None,
            rng: np.random.Generator | None = None) -> Scene:
    """A scene of ``items`` = [(shape, colour), …], one object per grid cell: cells drawn from ``rng``, or a
    canonical layout when ``rng`` is None.

    One item: any cell (canonical: (1, 1)). Two different shapes: any two cells, ``items[0]`` on the side
    ``relation`` says, along the axis on which the cells are strictly farther apart (canonical: side by side, or
    stacked when ``vertical`` or the relation is above/below). 2–3 identical items: a count, in cells that share no
    edge (canonical: (0, 0), (2, 0), (0, 2))."""
    items = [(str(s), str(c)) for s, c in items]
    if len(items) == 1:
        cell = (1, 1) if rng is None else _CELLS[int(rng.integers(len(_CELLS)))]
        return Scene((_object(*items[0], cell),))
    if len(items) == 2 and items[0][0] != items[1][0]:
        if rng is None:
            if relation is not None:
                vertical = relation in ("above", "below")
            a, b = ((1, 1), (1, 2)) if vertical else ((1, 1), (2, 1))
            if relation in ("right", "below"):
                a, b = b, a
        else:
            choices = [(a, b) for a in _CELLS for b in _CELLS if a != b
                       and (relation is None or _strict_relation(a, b) == relation)]
            a, b = choices[int(rng.integers(len(choices)))]
        return Scene((_object(*items[0], a), _object(*items[1], b)), relation)
    if 2 <= len(items) <= 3 and len(set(items)) == 1:
        if relation is not None:
            raise ValueError(f"compose: a count of identical objects has no relation, got {relation!r}")
        n = len(items)
        if rng is None:
            cells = [(0, 0), (2, 0), (0, 2)][:n]
        else:
            while True:  # rejection: n cells, no two sharing an edge (about 3 draws on average for 3 cells)
                idx = sorted(int(i) for i in rng.choice(len(_CELLS), size=n, replace=False))
                cells = [_CELLS[i] for i in idx]
                if not any(_touching(p, q) for k, p in enumerate(cells) for q in cells[k + 1:]):
                    break
        return Scene(tuple(_object(*items[0], c) for c in cells))
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
    return render_objects(scene.objects, size)


def render_objects(objects: Sequence[SceneObject], size: int = CANVAS) -> np.ndarray:
    """Any objects (not only a world scene: an image that misses its caption) drawn as ``render`` draws a scene."""
    if not isinstance(size, (int, np.integer)) or size < CANVAS or size % CANVAS:
        raise ValueError(f"render: size must be a positive multiple of {CANVAS} (pixel-exact shapes), got {size!r}")
    scale = size / CANVAS
    centres = (np.arange(size, dtype=np.float64) + 0.5) / scale
    u, v = np.meshgrid(centres, centres)  # (size, size): u = column centre, v = row centre
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for o in objects:
        image[_mask(o, u, v)] = PALETTE[o.colour]
    return image
