"""The `shapes` world's editing task: a source scene, an instruction, the edited scene.

Three kinds of instruction, each on a source of one or two objects (distinct shapes):

- ``recolor``: "make the circle red" (the named object takes a new colour, stays where it is);
- ``move``: "move the circle left of the square" (the first object is moved so that GenEval's
  relation to the second holds, which did not hold before; everything else stays);
- ``add``: "add a blue triangle" (a new object anywhere free; everything else stays).

The prompt is the source's description, ``then``, the instruction: "a green circle and a blue
square then make the circle red" (one prompt, one source image: the contract's
``backbone.source_images`` keys images by prompt). Everything is a pure function of a seed; the
train / held-out split is by a hash of the prompt, as the text-to-image prompts.

The exact evaluator (:func:`edit_checks`) parses the source image and the edited one with the
world's parser (:func:`genalign.shapes.evaluator.detect`) and checks (1) the edit: the recoloured
object has the new colour; the moved object stands in the relation to the reference; the added
object of that shape and colour is present, and the object count is the source's (plus one for
``add``); and (2) that nothing else changed: every other source object is found with its shape
and colour, its centre within ``MAX_SHIFT`` pixels of where it was. Score = share of the checks
that hold; ``strict`` = all of them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genalign.core.geneval import relative_position
from genalign.shapes.evaluator import POSITION_THRESHOLD, Checks, Detection, centre, detect
from genalign.shapes.world import (
    COLORS,
    IMAGE_SIZE,
    MAX_RADIUS,
    MIN_GAP,
    MIN_RADIUS,
    POSITIONS,
    SHAPES,
    ShapeObject,
    _article,
    _relation_holds,
    render,
)

KINDS = ("recolor", "move", "add")
MAX_SHIFT = 2.5  # pixels an unchanged object's centre may move (the parser's boxes are within ~1 px)
EDIT_WORDS = ("then", "make", "move", "add", "the")


@dataclass(frozen=True)
class EditExample:
    source: tuple[ShapeObject, ...]
    target: tuple[ShapeObject, ...]
    kind: str
    instruction: str
    prompt: str


def describe(objects: Sequence[ShapeObject]) -> str:
    """'a red circle and a blue square' (in the objects' order)."""
    return " and ".join(f"{_article(o.color)} {o.color} {o.shape}" for o in objects)


def parse_instruction(prompt: str) -> dict[str, str]:
    """The instruction of an edit prompt: {kind, shape, color} / {kind, shape, relation, reference}."""
    if " then " not in prompt:
        raise ValueError(f"not a shapes edit prompt (no ' then '): {prompt!r}")
    words = prompt.rsplit(" then ", 1)[1].split()
    if len(words) == 4 and words[:2] == ["make", "the"] and words[2] in SHAPES and words[3] in COLORS:
        return {"kind": "recolor", "shape": words[2], "color": words[3]}
    if len(words) == 4 and words[0] == "add" and words[2] in COLORS and words[3] in SHAPES:
        return {"kind": "add", "shape": words[3], "color": words[2]}
    text = " ".join(words)
    for relation in POSITIONS:
        for shape in SHAPES:
            for reference in SHAPES:
                if text == f"move the {shape} {relation} the {reference}":
                    return {"kind": "move", "shape": shape, "relation": relation, "reference": reference}
    raise ValueError(f"not a shapes edit instruction: {text!r}")


def _free_spot(rng: np.random.Generator, radius: float, others: Sequence[ShapeObject]) -> tuple[float, float] | None:
    for _ in range(200):
        c = (rng.uniform(radius + 0.5, IMAGE_SIZE - radius - 0.5), rng.uniform(radius + 0.5, IMAGE_SIZE - radius - 0.5))
        if all(math.dist(c, (o.cx, o.cy)) > radius + o.radius + MIN_GAP for o in others):
            return c
    return None


def _scene(rng: np.random.Generator, count: int) -> list[ShapeObject] | None:
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    colors = list(COLORS)
    objects: list[ShapeObject] = []
    for shape in shapes:
        radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
        spot = _free_spot(rng, radius, objects)
        if spot is None:
            return None
        objects.append(ShapeObject(shape, colors[rng.integers(len(colors))], spot[0], spot[1], radius))
    return objects


def make_example(kind: str, rng: np.random.Generator) -> EditExample:
    """One edit of ``kind`` drawn from ``rng``."""
    colors = list(COLORS)
    for _ in range(1000):
        source = _scene(rng, 2 if kind == "move" else int(rng.integers(1, 3)))
        if source is None:
            continue
        target = list(source)
        if kind == "recolor":
            index = int(rng.integers(len(source)))
            color = [c for c in colors if c != source[index].color][rng.integers(len(colors) - 1)]
            target[index] = ShapeObject(source[index].shape, color, source[index].cx, source[index].cy,
                                        source[index].radius)
            instruction = f"make the {source[index].shape} {color}"
        elif kind == "move":
            mover, reference = source
            relation = POSITIONS[rng.integers(len(POSITIONS))]
            if _relation_holds(mover, reference, relation):
                continue
            moved = None
            for _ in range(300):
                spot = _free_spot(rng, mover.radius, [reference])
                if spot is None:
                    continue
                candidate = ShapeObject(mover.shape, mover.color, spot[0], spot[1], mover.radius)
                if _relation_holds(candidate, reference, relation):
                    moved = candidate
                    break
            if moved is None:
                continue
            target[0] = moved
            instruction = f"move the {mover.shape} {relation} the {reference.shape}"
        elif kind == "add":
            free = [s for s in SHAPES if s not in {o.shape for o in source}]
            shape = free[rng.integers(len(free))]
            color = colors[rng.integers(len(colors))]
            radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
            spot = _free_spot(rng, radius, source)
            if spot is None:
                continue
            target.append(ShapeObject(shape, color, spot[0], spot[1], radius))
            instruction = f"add {_article(color)} {color} {shape}"
        else:
            raise ValueError(f"edit kind must be one of {KINDS}, got {kind!r}")
        prompt = f"{describe(source)} then {instruction}"
        source_image = render(source)
        if not all(edit_checks(render(target), source_image, prompt)[0]) or all(
                edit_checks(source_image, source_image, prompt)[0]):
            continue  # an edit the parser would misjudge (a relation within its box error): redraw
        return EditExample(tuple(source), tuple(target), kind, instruction, prompt)
    raise RuntimeError(f"could not make a {kind} edit")  # pragma: no cover


def held_out(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 4 == 0


def edit_examples(split: str = "train", seed: int = 0) -> Iterator[EditExample]:
    """An endless, seeded stream of edits of ``split`` (kinds in turn, prompts hashed into splits)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng(seed)
    index = 0
    while True:
        example = make_example(KINDS[index % len(KINDS)], rng)
        if held_out(example.prompt) == (split == "heldout"):
            index += 1
            yield example


def edit_set(split: str, count: int, seed: int = 0) -> list[EditExample]:
    """``count`` edits of ``split`` with distinct prompts (a prompt has one source image)."""
    seen: set[str] = set()
    out = []
    for example in edit_examples(split, seed):
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
            if len(out) == count:
                return out
    raise AssertionError("unreachable")  # pragma: no cover


def render_pair(example: EditExample) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) images (H, W, 3) in [0, 1]."""
    return render(list(example.source)), render(list(example.target))


# --------------------------------------------------------------------------- the exact evaluator


def _match(source: Detection, found: list[Detection]) -> Detection | None:
    """The edited image's object of the source object's shape nearest to where it was."""
    same = [d for d in found if d.shape == source.shape]
    return min(same, key=lambda d: math.dist(centre(d), centre(source))) if same else None


def edit_checks(image: Any, source_image: Any, prompt: str) -> tuple[list[bool], str]:
    """Which of the edit's checks hold for ``image`` (the edit of ``source_image`` asked by
    ``prompt``), and a reason naming the first that fails."""
    instruction = parse_instruction(prompt)
    before, after = detect(source_image), detect(image)
    kind, shape = instruction["kind"], instruction["shape"]
    check = Checks()

    expected = len(before) + (kind == "add")
    check(len(after) == expected, f"{len(after)} objects, expected {expected}")
    edited = None
    if kind == "recolor":
        source = next((d for d in before if d.shape == shape), None)
        edited = _match(source, after) if source is not None else None
        check(edited is not None and edited.color == instruction["color"]
              and math.dist(centre(edited), centre(source)) <= MAX_SHIFT,  # type: ignore[arg-type]
              f"the {shape} is not {instruction['color']} in its place")
    elif kind == "move":
        movers = [d for d in after if d.shape == shape]
        references = [d for d in after if d.shape == instruction["reference"]]
        source = next((d for d in before if d.shape == shape), None)
        edited = movers[0] if movers else None
        check(edited is not None and bool(references) and source is not None and edited.color == source.color
              and instruction["relation"] in relative_position(edited.bbox, references[0].bbox, POSITION_THRESHOLD),
              f"the {shape} is not {instruction['relation']} the {instruction['reference']}")
    else:
        additions = [d for d in after if d.shape == shape and d.color == instruction["color"]]
        edited = additions[0] if additions else None
        check(edited is not None, f"no {instruction['color']} {shape} added")
    for source in before:
        if kind in ("recolor", "move") and source.shape == shape:
            continue
        kept = _match(source, [d for d in after if d is not edited])
        check(kept is not None and kept.color == source.color
              and math.dist(centre(kept), centre(source)) <= MAX_SHIFT,
              f"the {source.color} {source.shape} changed")
    return check.outcome()


def edit_score(image: Any, source_image: Any, prompt: str) -> tuple[float, bool]:
    """(share of the checks that hold, all of them hold)."""
    checks, _ = edit_checks(image, source_image, prompt)
    return sum(checks) / len(checks), all(checks)


def edit_words() -> list[str]:
    """The words of every edit prompt (the editing model's tokenizer reads them whole)."""
    words = set(EDIT_WORDS) | set(SHAPES) | set(COLORS) | {"a", "an", "and", "of"}
    words |= {w for relation in POSITIONS for w in relation.split()}
    return sorted(words)
