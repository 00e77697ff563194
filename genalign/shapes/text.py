"""The `shapes` world's text task: render the prompt's quoted digits (Flow-GRPO's OCR task in small).

Prompts read ``a sign that reads "37"``: one to three digits, drawn as seven-segment glyphs
(``GLYPH_W`` x ``GLYPH_H`` pixels, strokes ``STROKE`` wide, ``GAP`` apart), white on black, the
string centred in the 32 x 32 image, rendered at 4x and box-filtered like the shapes. The OCR
reward's target is the quoted text, as in flow_grpo (``prompt.split('"')[1]``).

The exact reader (:func:`read_text`) fits each layout (one, two or three glyph slots): it takes
the mean grey level (relative to the image's brightest 1%) of every segment's own region (the part no other segment covers), a segment
is on above 0.5, and the layout whose re-rendered reading is closest to the image (mean absolute
difference, a blank slot costing ``BLANK_PENALTY``) wins; a slot's on-segments that are no digit
read ``?``, blank slots are dropped. On flat renders it reads every string exactly
(``tests/test_shapes_text.py``); on blurred, noisy, hue-drifted renders too.

Gold: ``strict`` = the reading equals the target; ``share`` = 1 - min(d, n) / n for the
Levenshtein distance d to the n-digit target (flow_grpo's formula without its substring rule).
The held-out split is a hash-chosen fifth of the two- and three-digit strings.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from genalign.shapes.world import IMAGE_SIZE, SUPERSAMPLE

GLYPH_W, GLYPH_H, STROKE, GAP = 8.0, 14.0, 2.0, 3.0
TOP = (IMAGE_SIZE - GLYPH_H) / 2
MAX_DIGITS = 3
BLANK_PENALTY = 0.002
INK = 0.2  # an image whose brightest 1% is darker than this shows no text
TEMPLATE = 'a sign that reads "{}"'

# Seven segments in glyph coordinates (x1, y1, x2, y2): a top, b top right, c bottom right, d bottom,
# e bottom left, f top left, g middle; and the part of each that no other segment covers (read there).
_W, _H, _S, _M = GLYPH_W, GLYPH_H, STROKE, GLYPH_H / 2
SEGMENTS = {
    "a": (0, 0, _W, _S), "b": (_W - _S, 0, _W, _M + _S / 2), "c": (_W - _S, _M - _S / 2, _W, _H),
    "d": (0, _H - _S, _W, _H), "e": (0, _M - _S / 2, _S, _H), "f": (0, 0, _S, _M + _S / 2),
    "g": (0, _M - _S / 2, _W, _M + _S / 2),
}
OWN = {
    "a": (_S, 0, _W - _S, _S), "b": (_W - _S, _S, _W, _M - _S / 2), "c": (_W - _S, _M + _S / 2, _W, _H - _S),
    "d": (_S, _H - _S, _W - _S, _H), "e": (0, _M + _S / 2, _S, _H - _S), "f": (0, _S, _S, _M - _S / 2),
    "g": (_S, _M - _S / 2, _W - _S, _M + _S / 2),
}
DIGITS = {"0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg", "5": "acdfg", "6": "acdefg",
          "7": "abc", "8": "abcdefg", "9": "abcdfg"}
_PATTERNS = {frozenset(segments): digit for digit, segments in DIGITS.items()}


def slot_origins(count: int) -> list[tuple[float, float]]:
    """Top-left corners of ``count`` glyph slots, the string centred."""
    width = count * GLYPH_W + (count - 1) * GAP
    left = (IMAGE_SIZE - width) / 2
    return [(left + i * (GLYPH_W + GAP), TOP) for i in range(count)]


@functools.cache
def _grid() -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    return np.meshgrid(coords, coords)


def _rectangle(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    """The supersampled (4H, 4W) mask of a rectangle in pixel coordinates."""
    xs, ys = _grid()
    return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)


def _coverage(mask: np.ndarray) -> np.ndarray:
    """(H, W) share of each pixel a supersampled mask covers (the box filter of the renders)."""
    return mask.astype(np.float32).reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def _segments_image(slots: list[str], count: int) -> np.ndarray:
    """(H, W) grey image of each slot's lit segments (a string of segment letters per slot)."""
    mask = np.zeros(_grid()[0].shape, dtype=bool)
    for (ox, oy), lit in zip(slot_origins(count), slots):
        for name in lit:
            x1, y1, x2, y2 = SEGMENTS[name]
            mask |= _rectangle(ox + x1, oy + y1, ox + x2, oy + y2)
    return _coverage(mask)


def check_text(text: str) -> str:
    if not 1 <= len(text) <= MAX_DIGITS or any(c not in DIGITS for c in text):
        raise ValueError(f"the shapes text task renders 1 to {MAX_DIGITS} digits, got {text!r}")
    return text


def render_text(text: str) -> np.ndarray:
    """Float image (H, W, 3) in [0, 1]: ``text``'s digits white on black, centred."""
    return render_segments([DIGITS[c] for c in check_text(text)])


def render_segments(slots: list[str]) -> np.ndarray:
    """Float image (H, W, 3) of 1-3 glyph slots, each lit at the given segments (letters a-g), laid
    out as a string of that many digits: glyphs that are no digit too."""
    if not 1 <= len(slots) <= MAX_DIGITS or any(set(lit) - set(SEGMENTS) for lit in slots):
        raise ValueError(f"1 to {MAX_DIGITS} slots of segments a-g, got {slots!r}")
    grey = _segments_image(slots, len(slots))
    return np.repeat(grey[..., None], 3, axis=2)


def malformed(rng: np.random.Generator) -> tuple[list[str], str]:
    """A random 1-3 glyph string with one glyph that is no digit (random lit segments): its slots
    and what the exact reader reads (``?`` there)."""
    count = int(rng.integers(1, MAX_DIGITS + 1))
    digits = [str(d) for d in rng.integers(0, 10, count)]
    slots = [DIGITS[d] for d in digits]
    while True:
        lit = "".join(name for name in SEGMENTS if rng.random() < 0.5)
        if lit and frozenset(lit) not in _PATTERNS:
            break
    bad = int(rng.integers(count))
    slots[bad], digits[bad] = lit, "?"
    return slots, "".join(digits)


@functools.cache
def _own_weights(count: int) -> np.ndarray:
    """(count, 7, H, W) normalised coverage of each slot's segments' own regions."""
    weights = np.zeros((count, len(OWN), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for slot, (ox, oy) in enumerate(slot_origins(count)):
        for k, (x1, y1, x2, y2) in enumerate(OWN.values()):
            cover = _coverage(_rectangle(ox + x1, oy + y1, ox + x2, oy + y2))
            weights[slot, k] = cover / cover.sum()
    return weights


def _grey(image: Any) -> np.ndarray:
    """(H, W) grey level in [0, 1] of an (H, W, 3) array or a (3, H, W) tensor."""
    array = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"the text reader takes {IMAGE_SIZE}x{IMAGE_SIZE} images, got {array.shape}")
    return array.clip(0, 1).mean(axis=2)


def read_text(image: Any) -> str:
    """The digits the image shows (``?`` for a slot whose lit segments are no digit)."""
    grey = _grey(image)
    peak = float(np.percentile(grey, 99))
    if peak > INK:  # generated text is dimmer and softer than the render: levels relative to its brightest
        grey = (grey / peak).clip(0, 1)
    best: tuple[float, str] | None = None
    for count in range(1, MAX_DIGITS + 1):
        levels = np.einsum("skhw,hw->sk", _own_weights(count), grey)
        slots = ["".join(name for name, on in zip(OWN, row) if on > 0.5) for row in levels]
        cost = float(np.abs(grey - _segments_image(slots, count)).mean()) + BLANK_PENALTY * slots.count("")
        reading = "".join(_PATTERNS.get(frozenset(lit), "?") for lit in slots if lit)
        if best is None or cost < best[0]:
            best = (cost, reading)
    assert best is not None
    return best[1]


def text_score(image: Any, target: str) -> tuple[float, bool]:
    """(1 - min(d, n) / n, reading == target) for the Levenshtein distance d of the reading."""
    import Levenshtein

    reading = read_text(image)
    distance = Levenshtein.distance(reading, target)
    return 1.0 - min(distance, len(target)) / len(target), reading == target


def prompt_for(text: str) -> str:
    return TEMPLATE.format(check_text(text))


def text_of(prompt: str) -> str:
    """The quoted text of a text-task prompt."""
    parts = prompt.split('"')
    if len(parts) != 3 or prompt != TEMPLATE.format(parts[1]):
        raise ValueError(f"not a shapes text prompt ({TEMPLATE!r}): {prompt!r}")
    return check_text(parts[1])


def held_out(text: str) -> bool:
    """A hash-chosen fifth of the two- and three-digit strings (every single digit is trained)."""
    return len(text) > 1 and int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0


def all_texts() -> list[str]:
    return [f"{n:0{k}d}" for k in range(1, MAX_DIGITS + 1) for n in range(10 ** k)]


def split_texts(split: str) -> list[str]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [t for t in all_texts() if held_out(t) == (split == "heldout")]


def text_examples(split: str = "train", seed: int = 0) -> Iterator[tuple[np.ndarray, str]]:
    """Endless (image, prompt) pairs of ``split``'s strings, the length uniform in 1..3, seeded."""
    rng = np.random.default_rng(seed)
    by_length = {k: [t for t in split_texts(split) if len(t) == k] for k in range(1, MAX_DIGITS + 1)}
    by_length = {k: v for k, v in by_length.items() if v}
    lengths = sorted(by_length)
    while True:
        pool = by_length[lengths[rng.integers(len(lengths))]]
        text = pool[rng.integers(len(pool))]
        yield render_text(text), prompt_for(text)


def evaluation_texts(split: str = "heldout", count: int = 120, seed: int = 0) -> list[str]:
    """``count`` strings of ``split``, as many of each length as there are (seeded)."""
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    groups = [[t for t in split_texts(split) if len(t) == k] for k in range(1, MAX_DIGITS + 1)]
    groups = [g for g in groups if g]
    for index, group in enumerate(groups):
        share = count // len(groups) + (index < count % len(groups))
        picks = rng.permutation(len(group))[:share]
        chosen += [group[i] for i in sorted(picks)]
    return chosen


def text_words() -> list[str]:
    return TEMPLATE.replace('"{}"', "").split()
