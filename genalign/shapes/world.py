"""The `shapes` world: coloured shapes on black with GenEval-style prompts and metadata.

Everything is a pure function of a seed. Prompts and their metadata follow GenEval's format
(``tag``, ``include`` with ``class``/``count``/``color``/``position``, ``exclude``, ``prompt``;
djghosh13/geneval ``prompts/evaluation_metadata.jsonl``) over the six GenEval tasks:
single_object, two_object, counting, colors, position, color_attr.

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB in [0, 1], rendered at 4x and box-filtered down
(soft edges, like a generator's output), objects never overlapping.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4

# Well-separated saturated colours (RGB 0-255): nearest-palette quantisation stays exact under the
# blur and colour noise of generated images.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "orange": (245, 150, 20),
    "yellow": (235, 225, 40),
    "green": (40, 190, 60),
    "cyan": (40, 210, 225),
    "blue": (50, 80, 235),
    "purple": (170, 60, 215),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Object half-size range in pixels (diameters 8-12 px in a 32 px image).
MIN_RADIUS, MAX_RADIUS = 4.0, 6.0
SQUARE_HALF = 0.85  # a square's half side / radius (about the circle's area)
TRIANGLE_BASE = 0.8  # a triangle spans y in [-r, 0.8 r] around its centre, apex up
MIN_GAP = 3.0  # pixels between objects' bounding circles: blurred neighbours stay apart


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    cx: float  # centre, pixels (x right, y down)
    cy: float
    radius: float

    def bbox(self) -> tuple[float, float, float, float]:
        """The exact extent of the drawn shape (x1, y1, x2, y2)."""
        r = self.radius
        if self.shape == "square":
            return (self.cx - SQUARE_HALF * r, self.cy - SQUARE_HALF * r, self.cx + SQUARE_HALF * r,
                    self.cy + SQUARE_HALF * r)
        if self.shape == "triangle":
            return (self.cx - r, self.cy - r, self.cx + r, self.cy + TRIANGLE_BASE * r)
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


# --------------------------------------------------------------------------- prompts


def all_prompts() -> list[dict[str, Any]]:
    """Every prompt of the world with its GenEval metadata, in a fixed order."""
    out: list[dict[str, Any]] = []
    for shape in SHAPES:
        out.append({"tag": "single_object", "include": [{"class": shape, "count": 1}],
                    "prompt": f"a photo of {_article(shape)} {shape}"})
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                out.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                            "prompt": f"a photo of {_article(a)} {a} and {_article(b)} {b}"})
    for shape in SHAPES:
        for n in (2, 3, 4):
            out.append({"tag": "counting", "include": [{"class": shape, "count": n}],
                        "exclude": [{"class": shape, "count": n + 1}],
                        "prompt": f"a photo of {NUMBERS[n]} {_plural(shape)}"})
    for color in COLORS:
        for shape in SHAPES:
            out.append({"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}],
                        "prompt": f"a photo of {_article(color)} {color} {shape}"})
    for a in SHAPES:
        for b in SHAPES:
            if a == b:
                continue
            for relation in POSITIONS:
                out.append({"tag": "position",
                            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
                            "prompt": f"a photo of {_article(a)} {a} {relation} {_article(b)} {b}"})
    for a in SHAPES:
        for b in SHAPES:
            if a == b:
                continue
            for ca in COLORS:
                for cb in COLORS:
                    if ca == cb:
                        continue
                    out.append({"tag": "color_attr",
                                "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                                "prompt": f"a photo of {_article(ca)} {ca} {a} and {_article(cb)} {cb} {b}"})
    return out


def _held_out(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 4 == 0


def split_prompts(split: str) -> list[dict[str, Any]]:
    """``train`` or ``heldout`` prompts. Tasks with many prompts (colors, position, counting,
    color_attr) hold out a fixed quarter by hash; single_object and two_object have too few
    prompts to split and appear in both (their images differ by seed)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    out = []
    for meta in all_prompts():
        if meta["tag"] in ("single_object", "two_object"):
            out.append(meta)
        elif _held_out(meta["prompt"]) == (split == "heldout"):
            out.append(meta)
    return out


def evaluation_set(split: str = "heldout", per_task: int = 50, seed: int = 0) -> list[dict[str, Any]]:
    """``per_task`` prompts of each task drawn (with repetition where a task has fewer) from a split."""
    rng = np.random.default_rng(seed)
    prompts = split_prompts(split)
    out = []
    for task in TASKS:
        pool = [m for m in prompts if m["tag"] == task]
        order = rng.permutation(len(pool))
        out += [pool[order[i % len(pool)]] for i in range(per_task)]
    return out


# --------------------------------------------------------------------------- scenes


def _place(rng: np.random.Generator, radii: list[float], tries: int = 200) -> list[tuple[float, float]]:
    """Centres at least MIN_GAP apart (bounding circles) inside the image, by rejection sampling."""
    for _ in range(tries):
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(50):
                c = (rng.uniform(r + 0.5, IMAGE_SIZE - r - 0.5), rng.uniform(r + 0.5, IMAGE_SIZE - r - 0.5))
                if all(math.dist(c, d) > r + rd + MIN_GAP for d, rd in zip(centres, radii)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError(f"could not place {len(radii)} objects")  # pragma: no cover


def _relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """The relation holds for the exact boxes and for boxes 1 px larger or smaller (a detector's
    boxes of the rendered, anti-aliased shapes are within that), so ground truth is unambiguous."""
    from genalign.core.geneval import relative_position

    def grown(box: tuple[float, float, float, float], d: float) -> tuple[float, ...]:
        return (box[0] - d, box[1] - d, box[2] + d, box[3] + d)

    return all(relation in relative_position(grown(a.bbox(), d), grown(b.bbox(), d)) for d in (-1.0, 0.0, 1.0))


def scene_for(meta: dict[str, Any], rng: np.random.Generator) -> list[ShapeObject]:
    """A scene that satisfies ``meta`` (the ground truth for its prompt)."""
    colors = list(COLORS)
    specs: list[tuple[str, str]] = []  # (shape, colour) per object
    for clause in meta["include"]:
        for _ in range(clause["count"]):
            specs.append((clause["class"], clause.get("color") or colors[rng.integers(len(colors))]))
    position = next((c["position"] for c in meta["include"] if "position" in c), None)
    for _ in range(500):
        radii = [float(rng.uniform(MIN_RADIUS, MAX_RADIUS)) for _ in specs]
        centres = _place(rng, radii)
        objects = [ShapeObject(s, c, x, y, r) for (s, c), (x, y), r in zip(specs, centres, radii)]
        if position is None:
            return objects
        relation, _ = position
        # include[0] is the reference object, include[1] the one placed relative to it
        if _relation_holds(objects[1], objects[0], relation):
            return objects
    raise RuntimeError(f"could not build a scene for {meta['prompt']!r}")  # pragma: no cover


def _shape_mask(obj: ShapeObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy = xs - obj.cx, ys - obj.cy
    r = obj.radius
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        half = r * SQUARE_HALF
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.shape == "triangle":  # apex up, base at the bottom
        top, bottom = -r, TRIANGLE_BASE * r
        inside_y = (dy >= top) & (dy <= bottom)
        half_width = r * (dy - top) / (bottom - top)
        return inside_y & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(objects: list[ShapeObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """Float image (H, W, 3) in [0, 1]: black background, anti-aliased shapes."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE * (IMAGE_SIZE / size)
    xs, ys = np.meshgrid(coords, coords)
    canvas = np.zeros((n, n, 3), dtype=np.float32)
    for obj in objects:
        canvas[_shape_mask(obj, xs, ys)] = np.array(COLORS[obj.color], dtype=np.float32) / 255.0
    return canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))


def sample_example(meta: dict[str, Any], seed: int) -> tuple[np.ndarray, list[ShapeObject]]:
    """The rendered ground-truth image for a prompt, deterministic in (prompt, seed)."""
    digest = int(hashlib.sha256(f"{meta['prompt']}|{seed}".encode()).hexdigest(), 16) % (2**63)
    objects = scene_for(meta, np.random.default_rng(digest))
    return render(objects), objects


def training_examples(seed: int = 0, split: str = "train") -> Iterator[tuple[np.ndarray, str, dict[str, Any]]]:
    """An endless, seeded stream of (image, caption, metadata): a task uniformly, then one of its
    prompts in the split uniformly (color_attr alone has most of the prompts)."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for meta in split_prompts(split):
        by_task.setdefault(meta["tag"], []).append(meta)
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        pool = by_task[TASKS[rng.integers(len(TASKS))]]
        meta = pool[rng.integers(len(pool))]
        image, _ = sample_example(meta, seed * 1_000_003 + i)
        yield image, meta["prompt"], meta
        i += 1
