"""The moving-shapes world: short videos (``FRAMES`` frames of 32 x 32) of one shape that moves in a
named direction or changes colour, and an exact evaluator of them.

Prompts: ``a red circle moving to the right`` (7 colours x 3 shapes x 4 directions) and ``a square
turning from red to blue`` (3 shapes x 42 colour pairs). A motion video moves its shape 12-16 px at
constant speed; a colour change keeps it in place and switches colour once, at frame 3, 4 or 5.
Frames are rendered as the image world renders (``world.render``: anti-aliased, box-filtered).

The evaluator parses every frame with the image world's exact parser (``evaluator.detect``) and
checks, for a motion prompt: one object in every frame, of the named shape (in two thirds of the
frames at least: the parser can misread a small, soft triangle in one frame), of the named colour,
moving the named way (at least ``MIN_TRAVEL`` px along the direction between the first and the last
frame, at most ``MAX_DRIFT`` across it) and smoothly (no step backwards by more than ``JITTER`` px
and none longer than ``MAX_STEP`` px); for a colour change: one object in every frame, of the named
shape, the first colour in the first frame, the second in the last, and one switch in place (the
colours run first-then-second with no third, and the object stays within ``MAX_DRIFT`` px of where
it started). Its gold is the share of checks that hold (``clauses``) or all of them (``strict``).

Held out: a hash-chosen quarter of the prompts of each kind.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from genalign.shapes.evaluator import Checks, centre, detect
from genalign.shapes.world import COLORS, IMAGE_SIZE, SHAPES, ShapeObject, render

FRAMES = 9  # 4k + 1 for Wan's real VAE; 2k + 1 for the world's (temporal factor 2): 5 latent frames
DIRECTIONS: dict[str, tuple[int, int]] = {"to the right": (1, 0), "to the left": (-1, 0), "up": (0, -1),
                                          "down": (0, 1)}
TRAVEL = (12.0, 16.0)  # pixels a motion video's shape travels, first frame to last
RADIUS = (4.0, 5.5)
MIN_TRAVEL = 6.0  # the evaluator: at least half of the shortest rendered travel
MAX_DRIFT = 3.0  # pixels across the direction (motion) or from the start (colour change)
JITTER = 0.75  # a step backwards shorter than this is the parser's box jitter
MAX_STEP = 4.0  # a rendered step is at most 2 px: a longer one is a jump
SHAPE_SHARE = 2 / 3  # the named shape in at least this share of the frames (a soft small triangle can parse as
# a circle in one frame; the shape of a generated object does not change between frames)
KINDS = ("motion", "color_change")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_video_prompts() -> list[dict[str, Any]]:
    """Every prompt with what it asks: ``kind``, ``shape`` and ``color`` + ``direction`` (motion) or
    ``colors`` (first, second) (colour change), in a fixed order."""
    out: list[dict[str, Any]] = []
    for color in COLORS:
        for shape in SHAPES:
            for direction in DIRECTIONS:
                out.append({"kind": "motion", "shape": shape, "color": color, "direction": direction,
                            "prompt": f"{_article(color)} {color} {shape} moving {direction}"})
    for shape in SHAPES:
        for first in COLORS:
            for second in COLORS:
                if first != second:
                    out.append({"kind": "color_change", "shape": shape, "colors": [first, second],
                                "prompt": f"{_article(shape)} {shape} turning from {first} to {second}"})
    return out


_BY_PROMPT: dict[str, dict[str, Any]] = {}


def parse_video_prompt(prompt: str) -> dict[str, Any]:
    """The request of one of the world's prompts (a clear error for any other)."""
    if not _BY_PROMPT:
        _BY_PROMPT.update({meta["prompt"]: meta for meta in all_video_prompts()})
    if prompt not in _BY_PROMPT:
        raise ValueError(f"not a moving-shapes prompt: {prompt!r} (e.g. 'a red circle moving to the right', "
                         "'a square turning from red to blue')")
    return _BY_PROMPT[prompt]


def held_out(prompt: str) -> bool:
    return int(hashlib.sha256(f"video|{prompt}".encode()).hexdigest(), 16) % 4 == 0


def split_video_prompts(split: str) -> list[dict[str, Any]]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [m for m in all_video_prompts() if held_out(m["prompt"]) == (split == "heldout")]


def video_evaluation_set(split: str = "heldout", per_kind: int = 60, seed: int = 0) -> list[str]:
    """``per_kind`` prompts of each kind from a split (each prompt once before any repeats)."""
    rng = np.random.default_rng(seed)
    prompts = split_video_prompts(split)
    out = []
    for kind in KINDS:
        pool = [m["prompt"] for m in prompts if m["kind"] == kind]
        order = rng.permutation(len(pool))
        out += [pool[order[i % len(pool)]] for i in range(per_kind)]
    return out


# --------------------------------------------------------------------------- scenes and renders


def video_scene(meta: dict[str, Any], rng: np.random.Generator) -> list[ShapeObject]:
    """The object in each of the ``FRAMES`` frames (the ground truth for ``meta``)."""
    r = float(rng.uniform(*RADIUS))
    low, high = r + 0.5, IMAGE_SIZE - r - 0.5
    if meta["kind"] == "motion":
        dx, dy = DIRECTIONS[meta["direction"]]
        travel = float(rng.uniform(*TRAVEL))
        start_along = float(rng.uniform(low, high - travel))  # the path stays inside the frame
        across = float(rng.uniform(low, high))
        path = []
        for f in range(FRAMES):
            along = start_along + travel * f / (FRAMES - 1)
            along = along if dx + dy > 0 else IMAGE_SIZE - along  # left / up: from the far side
            path.append((along, across) if dx else (across, along))
        return [ShapeObject(meta["shape"], meta["color"], x, y, r) for x, y in path]
    x, y = float(rng.uniform(low, high)), float(rng.uniform(low, high))
    switch = int(rng.integers(3, 6))  # frames before it show the first colour
    first, second = meta["colors"]
    return [ShapeObject(meta["shape"], first if f < switch else second, x, y, r) for f in range(FRAMES)]


def render_video(objects: Sequence[ShapeObject]) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1], one rendered frame per object."""
    return np.stack([render([obj]) for obj in objects])


def video_example(meta: dict[str, Any], seed: int) -> np.ndarray:
    """The rendered ground-truth video of a prompt, deterministic in (prompt, seed)."""
    digest = int(hashlib.sha256(f"{meta['prompt']}|{seed}".encode()).hexdigest(), 16) % (2**63)
    return render_video(video_scene(meta, np.random.default_rng(digest)))


def video_examples(split: str = "train", seed: int = 0) -> Iterator[tuple[np.ndarray, str]]:
    """An endless, seeded stream of (video, prompt): a kind uniformly, then one of its prompts."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for meta in split_video_prompts(split):
        by_kind.setdefault(meta["kind"], []).append(meta)
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        pool = by_kind[KINDS[rng.integers(len(KINDS))]]
        meta = pool[rng.integers(len(pool))]
        yield video_example(meta, seed * 1_000_003 + i), meta["prompt"]
        i += 1


def video_words() -> list[str]:
    """Every word of the prompts (the video model's tokenizer reads them whole)."""
    return sorted({w for meta in all_video_prompts() for w in meta["prompt"].split()})


# --------------------------------------------------------------------------- the exact evaluator


def _frames(video: Any) -> list[Any]:
    """A video's frames: (F, H, W, 3) arrays or (F, 3, H, W) tensors in [0, 1]."""
    if hasattr(video, "detach") and video.ndim == 4 and video.shape[1] == 3:
        return list(video.detach().float().cpu().unbind(0))
    array = np.asarray(video)
    if array.ndim != 4:
        raise ValueError(f"a video is (F, H, W, 3) or (F, 3, H, W); got shape {array.shape}")
    return list(array)


def video_checks(video: Any, prompt: str) -> tuple[list[bool], str]:
    """Which of the prompt's five checks hold for ``video``, and a reason naming the first that fails."""
    meta = parse_video_prompt(prompt)
    found = [detect(frame) for frame in _frames(video)]
    single = [f[0] for f in found if len(f) == 1]  # the frames that show one object
    check = Checks()

    counts = [len(f) for f in found]
    check(all(c == 1 for c in counts), f"objects per frame {counts}, expected one in each")
    shaped = sum(d.shape == meta["shape"] for d in single)
    check(shaped >= SHAPE_SHARE * len(found), f"a {meta['shape']} in {shaped} of {len(found)} frames")
    centres = [centre(d) for d in single]
    if meta["kind"] == "motion":
        check(bool(single) and all(d.color == meta["color"] for d in single), f"not {meta['color']} throughout")
        dx, dy = DIRECTIONS[meta["direction"]]
        along = [x * dx + y * dy for x, y in centres]
        across = [x * dy - y * dx for x, y in centres]
        moved = len(single) >= 2 and along[-1] - along[0] >= MIN_TRAVEL and abs(across[-1] - across[0]) <= MAX_DRIFT
        check(moved, f"does not move {meta['direction']}")
        steps = [b - a for a, b in zip(along, along[1:])]
        check(len(single) == len(found) and len(steps) >= 1 and all(-JITTER <= s <= MAX_STEP for s in steps),
              "the motion is not smooth")
    else:
        first, second = meta["colors"]
        colours = [d.color for d in single]
        check(len(found[0]) == 1 and found[0][0].color == first, f"does not start {first}")
        check(len(found[-1]) == 1 and found[-1][0].color == second, f"does not end {second}")
        switches = sum(a != b for a, b in zip(colours, colours[1:]))
        in_place = all(math.dist(c, centres[0]) <= MAX_DRIFT for c in centres)
        check(len(single) == len(found) and set(colours) <= {first, second} and switches == 1 and in_place,
              "not one colour change in place")
    return check.outcome()


def video_score(video: Any, prompt: str) -> tuple[float, bool]:
    """(share of the checks that hold, all of them hold)."""
    checks, _ = video_checks(video, prompt)
    return sum(checks) / len(checks), all(checks)
