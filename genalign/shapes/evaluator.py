"""The exact evaluator of the `shapes` world: parse an image, score it with GenEval's rules.

Parsing needs no learned model (see :func:`detect`): median-filtered pixels, foreground
components (8-connected, scipy.ndimage.label), split by nearest palette colour by chromaticity (so
the dark anti-aliased rims of a shape keep its colour); each object's shape comes from its
half-maximum outline: the brightness at its box's corners (a square fills them, a circle does not,
a triangle only at the bottom) and the width of its top quarter against its bottom quarter.

Scoring is GenEval's, the same code the GenEval benchmark runs (:mod:`genalign.core.geneval`):
every ``include`` clause needs ``count`` objects of its class, the first ``count`` of them (largest
first here, most confident first there) must have the clause's colour and stand in the clause's
relation to every object of the referenced clause (relative_position with POSITION_THRESHOLD 0.1
on boxes); an ``exclude`` clause fails when ``count`` or more objects of its class are present.
Overall = mean of the per-task accuracies. :class:`ShapesDetector` puts the parser behind the
shared Detector contract for the GenEval scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genalign.core.detection import Detection as GenericDetection
from genalign.core.geneval import Verdict, detector_colors, select_objects
from genalign.core.geneval import evaluate as geneval_evaluate
from genalign.shapes.world import COLORS, SHAPES, TASKS

POSITION_THRESHOLD = 0.1  # GenEval's default
FOREGROUND = 0.35  # brightest channel above this = foreground (palette maxima are >= 0.9)
MIN_AREA = 6  # pixels; smaller components are noise
MIN_COLOUR_SHARE = 0.2  # a colour must hold this share of a component's core to be an object

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32) / 255.0
_PALETTE_CHROMA = _PALETTE / _PALETTE.max(axis=1, keepdims=True)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels (x2, y2 exclusive)
    area: int


def to_numpy_image(image: Any) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a float/uint8 array, a (3, H, W) tensor or a PIL image."""
    if hasattr(image, "detach"):  # torch tensor (3, H, W) in [0, 1]
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3:
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def classify_shape(mask: np.ndarray, brightness: np.ndarray) -> str:
    """Circle, square or triangle from an object's half-maximum mask and its brightness (both
    cropped to the mask's bounding box; brightness divided by the object's peak).

    Features, measured on 150 rendered shapes each, clean and with Gaussian blur 0.5-1 px plus
    colour noise (2nd-98th percentiles): brightness at the box's corners is 0-0.25 for circles,
    0.25-1 for squares, and for triangles 0-0.14 at the top but 0.33-1 at the bottom; the width
    of the top quarter over the bottom quarter is 0.1-0.5 (at most 0.7 blurred) for triangles and
    0.5-1.9 for the others.
    """
    height = mask.shape[0]
    widths = mask.sum(axis=1).astype(np.float32)
    quarter = max(1, height // 4)
    asymmetry = widths[:quarter].mean() / max(widths[-quarter:].mean(), 1e-6)
    top = (brightness[0, 0] + brightness[0, -1]) / 2
    bottom = (brightness[-1, 0] + brightness[-1, -1]) / 2
    if asymmetry < 0.4 or (asymmetry < 0.75 and bottom >= 0.25 and top < 0.4 * bottom):
        return "triangle"
    return "square" if (top + bottom) / 2 >= 0.24 else "circle"


def detect(image: Any) -> list[Detection]:
    """Objects in an image, largest first.

    Objects are found on a 3x3-median-filtered copy (pixel noise gone): foreground components
    regardless of colour, each split by palette colour within its core (pixels at least half as
    bright as its brightest), so that touching objects of different colours stay apart and noisy
    rims make no objects. The shape is then measured on the unfiltered image (the filter rounds
    the corners of small squares): the half-maximum mask around the object.
    """
    from scipy import ndimage

    raw = to_numpy_image(image)
    raw_brightness = raw.max(axis=2)
    pixels = ndimage.median_filter(raw, size=(3, 3, 1))
    brightness = pixels.max(axis=2)
    chroma = pixels / np.maximum(brightness, 1e-6)[..., None]
    nearest = ((chroma[:, :, None, :] - _PALETTE_CHROMA[None, None]) ** 2).sum(axis=-1).argmin(axis=-1)
    structure = np.ones((3, 3), dtype=bool)
    components, _ = ndimage.label(brightness > FOREGROUND, structure=structure)
    found: list[Detection] = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        region = components == index
        core = region & (brightness >= 0.5 * brightness[region].max())
        for k in np.unique(nearest[core]):
            part = core & (nearest == k)
            if part.sum() < max(MIN_AREA, MIN_COLOUR_SHARE * core.sum()):
                continue  # a rim or a speck of another colour, not an object
            pieces, count = ndimage.label(part, structure=structure)
            for piece_index in range(1, count + 1):
                piece = pieces == piece_index
                if piece.sum() < MIN_AREA:
                    continue
                around = ndimage.binary_dilation(piece, structure=structure)
                peak = float(np.percentile(raw_brightness[piece], 90))  # robust to noisy maxima
                mask = around & (raw_brightness >= 0.5 * peak)
                rows, cols = np.nonzero(mask)
                y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
                relative = np.where(around, raw_brightness, 0.0)[y0:y1, x0:x1] / peak
                found.append(Detection(
                    classify_shape(mask[y0:y1, x0:x1], relative), _PALETTE_NAMES[k],
                    (float(x0), float(y0), float(x1), float(y1)), int(mask.sum()),
                ))
    return sorted(found, key=lambda d: -d.area)


def as_detections(found: Sequence[Detection]) -> list[GenericDetection]:
    """The parser's objects as detections of the shared contract: label = shape, score 1 (the
    parser is certain; largest first is kept as the order), colour known."""
    return [GenericDetection(d.shape, 1.0, d.bbox, color=d.color) for d in found]


class ShapesDetector:
    """The exact parser behind the :class:`genalign.core.detection.Detector` contract, so the GenEval
    scorer runs on shapes images with this detector in place of Mask2Former (colours come with the
    detections: score with ``colors=detector_colors``)."""

    classes: Sequence[str] | None = SHAPES

    def detect(self, images: Sequence[Any], labels: Sequence[str] | None = None) -> list[list[GenericDetection]]:
        found = [as_detections(detect(image)) for image in images]
        if labels is not None:
            found = [[d for d in dets if d.label in labels] for dets in found]
        return found


def verdict(image: Any, meta: dict[str, Any], detections: list[Detection] | None = None) -> Verdict:
    """GenEval's verdict (:func:`genalign.core.geneval.evaluate`) on one image for its metadata row."""
    if detections is None:
        detections = detect(image)
    objects = select_objects(as_detections(detections), meta["tag"])
    return geneval_evaluate(objects, meta, detector_colors, POSITION_THRESHOLD)


def check_clauses(image: Any, meta: dict[str, Any], detections: list[Detection] | None = None) -> tuple[list[bool], str]:
    """Whether each of the prompt's GenEval clauses (``include`` then ``exclude``) holds, and why not."""
    result = verdict(image, meta, detections)
    return list(result.clauses), result.reason.replace("\n", "; ")


def evaluate(image: Any, meta: dict[str, Any], detections: list[Detection] | None = None) -> tuple[bool, str]:
    """(correct, reason) of one image against its prompt's GenEval metadata: every clause holds."""
    result = verdict(image, meta, detections)
    return result.correct, result.reason.replace("\n", "; ")


def score(images: Sequence[Any], metas: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-task accuracy and ``overall`` (mean over the tasks present), GenEval's summary."""
    if len(images) != len(metas):
        raise ValueError(f"{len(images)} images but {len(metas)} metadata rows")
    return accuracy([evaluate(image, meta)[0] for image, meta in zip(images, metas)], metas)


def accuracy(verdicts: Sequence[bool], metas: Sequence[dict[str, Any]]) -> dict[str, float]:
    """:func:`score` from each image's verdict (correct or not) and its metadata row."""
    per_task: dict[str, list[bool]] = {}
    for correct, meta in zip(verdicts, metas, strict=True):
        per_task.setdefault(meta["tag"], []).append(correct)
    result = {task: float(np.mean(v)) for task in TASKS if (v := per_task.get(task))}
    result["overall"] = float(np.mean(list(result.values()))) if result else 0.0
    return result
