"""The exact evaluator beyond flat renders: hue drift across an object, soft and touching edges,
off-palette colours, speckle; and its agreement with the labelled set of generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from genalign.shapes.evaluator import OFF_PALETTE, detect, evaluate
from genalign.shapes.labelling import Label, Source, compare, parse_label_line
from genalign.shapes.world import COLORS, ShapeObject, render

LABELLED = Path(__file__).resolve().parent.parent / "models" / "shapes" / "labelled"


def coverage(obj: ShapeObject) -> np.ndarray:
    """(H, W) share of each pixel the shape covers, from the world's anti-aliased render."""
    rendered = render([ShapeObject(obj.shape, "red", obj.cx, obj.cy, obj.radius)])
    return rendered[..., 0] / (COLORS["red"][0] / 255.0)


def paint(objects: list[tuple[ShapeObject, object]]) -> np.ndarray:
    """An image of shapes, each coloured by an RGB triple (0-255) or by a function of x (pixels)
    giving one, so colours may drift across a shape."""
    image = np.zeros((32, 32, 3), np.float32)
    xs = np.arange(32, dtype=np.float32)
    for obj, color in objects:
        rgb = np.array([color(x) for x in xs], np.float32)[None] if callable(color) else np.array(color, np.float32)
        image = np.maximum(image, coverage(obj)[..., None] * rgb / 255.0)
    return image


def drift(start: str, end: str, x0: float, x1: float):
    """A colour going from palette colour ``start`` at x0 to ``end`` at x1, linearly."""
    a, b = np.array(COLORS[start], np.float32), np.array(COLORS[end], np.float32)
    return lambda x: a + (b - a) * float(np.clip((x - x0) / (x1 - x0), 0, 1))


def found(image) -> list[tuple[str, str]]:
    return sorted((d.shape, d.color) for d in detect(image))


@pytest.mark.parametrize("shape,start,end", [
    ("circle", "green", "cyan"), ("triangle", "blue", "purple"), ("square", "red", "orange"),
    ("circle", "orange", "yellow"), ("triangle", "cyan", "blue"),
])
def test_a_shape_whose_hue_drifts_is_one_object(shape, start, end):
    """The colour goes from one palette colour to its neighbour across the object: one object of the
    right shape, named by the colour of most of it (the middle of the drift sits at 3/4 of the width)."""
    obj = ShapeObject(shape, start, 16, 16, 5.5)
    image = paint([(obj, drift(start, end, 10.5, 25))])
    (detection,) = detect(image)
    assert detection.shape == shape
    assert detection.color in (start, end)
    meta = {"tag": "counting", "include": [{"class": shape, "count": 1}], "prompt": f"one {shape}"}
    assert evaluate(image, meta)[0]


def test_three_triangles_one_drifting_are_three():
    """The case from the issue: three triangles, one drifting from blue to purple, are three."""
    objects = [(ShapeObject("triangle", "blue", 8, 9, 5), COLORS["blue"]),
               (ShapeObject("triangle", "green", 24, 9, 5), COLORS["green"]),
               (ShapeObject("triangle", "blue", 16, 24, 5.5), drift("blue", "purple", 10, 22))]
    image = paint(objects)
    assert [s for s, _ in found(image)] == ["triangle"] * 3
    meta = {"tag": "counting", "include": [{"class": "triangle", "count": 3}],
            "exclude": [{"class": "triangle", "count": 4}], "prompt": "a photo of three triangles"}
    assert evaluate(image, meta)[0]


@pytest.mark.parametrize("first,second,gap", [
    (("circle", "red"), ("circle", "red"), 0.0),         # same colour, just touching
    (("circle", "blue"), ("circle", "blue"), -1.0),      # same colour, overlapping by 1 px
    (("square", "green"), ("triangle", "yellow"), 0.0),  # different colours and shapes
    (("circle", "cyan"), ("square", "cyan"), 0.5),       # blurred across a half-pixel gap
])
def test_touching_objects_are_two(first, second, gap):
    """Two objects side by side whose outlines touch or overlap a little: the neck between them
    splits the region, whatever their colours."""
    r = 5.0
    a = ShapeObject(first[0], first[1], 16 - r - gap / 2, 16, r)
    b = ShapeObject(second[0], second[1], 16 + r + gap / 2, 16, r)
    image = paint([(a, COLORS[a.color]), (b, COLORS[b.color])])
    image = ndimage.gaussian_filter(image, (0.5, 0.5, 0))
    assert found(image) == sorted([first, second])


@pytest.mark.parametrize("sigma", [0.7, 1.0])
def test_soft_edges_keep_counts_and_shapes(sigma):
    objects = [ShapeObject("circle", "red", 8, 8, 5), ShapeObject("square", "blue", 24, 8, 5),
               ShapeObject("triangle", "green", 16, 24, 5.5)]
    image = ndimage.gaussian_filter(render(objects), (sigma, sigma, 0))
    assert found(image) == sorted([("circle", "red"), ("square", "blue"), ("triangle", "green")])


@pytest.mark.parametrize("rgb", [(255, 150, 200), (220, 220, 220), (120, 200, 140)])
def test_an_off_palette_colour_is_reported_and_fails_a_colour_clause(rgb):
    """Pink, white and a pale green are no palette colour: the object is found, its colour is
    OFF_PALETTE, and a clause asking for any colour fails, while a clause without colour holds."""
    image = paint([(ShapeObject("circle", "red", 16, 16, 5.5), rgb)])
    assert found(image) == [("circle", OFF_PALETTE)]
    nearest = "purple" if rgb[2] > rgb[1] else "green"
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": nearest}],
            "prompt": f"a photo of a {nearest} circle"}
    correct, reason = evaluate(image, meta)
    assert not correct and OFF_PALETTE in reason
    assert evaluate(image, {"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                            "prompt": "a photo of a circle"})[0]


def test_speckle_makes_no_objects():
    """Isolated bright pixels and 2x2 specks of any colour on the background are not objects."""
    rng = np.random.default_rng(0)
    image = render([ShapeObject("square", "orange", 16, 16, 5)])
    for _ in range(12):
        y, x = rng.integers(0, 32, 2)
        if image[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3].max() == 0:
            image[y : y + rng.integers(1, 3), x : x + rng.integers(1, 3)] = rng.uniform(0.5, 1, 3)
    assert found(image) == [("square", "orange")]


def test_a_bright_speck_joined_to_an_object_by_a_dim_trail_is_no_object():
    """A 3x3 speck as bright as the square, joined to it by a dim trail (one foreground region whose
    bright core has two pieces): the speck is too small to seed an object of its own."""
    image = render([ShapeObject("square", "blue", 10, 16, 5)])
    image[15:18, 13:20] = np.maximum(image[15:18, 13:20], 0.42 * np.array(COLORS["blue"]) / 255.0)  # dim trail
    image[15:18, 19:22] = np.array(COLORS["blue"]) / 255.0  # bright speck at its end
    assert [color for _, color in found(image)] == ["blue"]  # one object (the trail may bend its shape)


# --------------------------------------------------------------------------- labels


def test_label_lines_parse_and_bad_ones_are_named():
    label = parse_label_line("0012 | red circle, ? square | yes")
    assert label == Label(12, (("circle", "red"), ("square", "?")), True)
    assert parse_label_line("7 | - | no") == Label(7, (), False)
    for bad, match in [("12 | red circle", "ID | objects"), ("x | - | no", "number"), ("1 | - | maybe", "yes, no or"),
                       ("1 | pink circle | no", "unknown colour"), ("1 | red | no", "colour shape")]:
        with pytest.raises(ValueError, match=match):
            parse_label_line(bad)


def test_model_specs_parse_and_bad_ones_are_named():
    assert Source.parse("sd-dpo=sd:models/shapes/sd:runs/dpo/lora.safetensors") == Source(
        "sd-dpo", "sd", "models/shapes/sd", "runs/dpo/lora.safetensors")
    assert Source.parse("sd3-base=sd3:models/shapes/sd3") == Source("sd3-base", "sd3", "models/shapes/sd3", None)
    with pytest.raises(ValueError, match="NAME=FAMILY:PATH"):
        Source.parse("models/shapes/sd")


def test_comparison_with_a_label_counts_unclear_as_any():
    label = Label(0, (("circle", "red"), ("triangle", "?")), True)
    assert compare([("triangle", "blue"), ("circle", "red")], True, label) == {
        "objects": True, "shapes": True, "colours": True, "verdicts": True}
    assert compare([("square", "blue"), ("circle", "red")], False, label) == {
        "objects": True, "shapes": False, "colours": True, "verdicts": False}
    assert compare([("circle", "red")], True, label)["objects"] is False


def test_the_evaluator_agrees_with_the_labelled_generated_images():
    """The labelled set (generated images of the shipped models, base and fine-tuned, labelled by a
    person; figures in docs/evaluation.md): the evaluator must not fall below what it reached when
    the set was labelled, less about one image's worth (on 324 images: objects 0.988, verdicts
    0.983, colours 0.972, shapes 0.960; the previous parser, which split objects by colour:
    objects 0.873, verdicts 0.942)."""
    from genalign.shapes.labelling import evaluator_agreement

    table = evaluator_agreement(LABELLED)
    overall = table["all"]
    assert overall["n"] >= 324
    assert overall["objects"] >= 0.985 and overall["verdicts"] >= 0.98, table
    assert overall["colours"] >= 0.965 and overall["shapes"] >= 0.955, table
