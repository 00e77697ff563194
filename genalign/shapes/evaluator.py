"""The exact evaluator of the `shapes` world: parse an image, score it with GenEval's rules.

Parsing needs no learned model (see :func:`detect`): median-filtered pixels, foreground
components (8-connected, scipy.ndimage.label), split only where the outline shows touching objects
(a narrow neck in the distance transform, :func:`split_touching`), never by colour, so a shape
whose hue drifts stays one object; its colour is named from the hue of its core's median
chromaticity (:func:`object_color`; OFF_PALETTE far from every palette hue or when pale); its shape
from moments of its brightness (:func:`classify_shape`: vertical skewness for triangles, squareness
for squares against circles).

Scoring is GenEval's, the same code the GenEval benchmark runs (:mod:`genalign.core.geneval`):
every ``include`` clause needs ``count`` objects of its class, the first ``count`` of them (largest
first here, most confident first there) must have the clause's colour and stand in the clause's
relation to every object of the referenced clause (relative_position with POSITION_THRESHOLD 0.1
on boxes); an ``exclude`` clause fails when ``count`` or more objects of its class are present.
Overall = mean of the per-task accuracies. :class:`ShapesDetector` puts the parser behind the
shared Detector contract for the GenEval scorer.
"""

from __future__ import annotations

import colorsys
import heapq
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
TRIANGLE_SKEW = -0.16  # vertical skewness up to which an object is an (apex-up) triangle
SQUARE_MIN = 0.48  # squareness from which an object is a square whatever its outline
ROUND_MAX = 0.42  # squareness up to which a non-triangle is a circle whatever its corners
NECK_RATIO = 0.75  # touching objects: the neck's half width is below this share of each one's half width
MIN_CORE = 1.5  # pixels; an object's half width (distance-transform peak) is at least this
HUE_TOLERANCE = 30.0  # degrees; an object's hue farther than this from every palette hue has no palette colour
MIN_SATURATION = 0.45  # paler objects (white, grey, pink) have no palette colour
OFF_PALETTE = "off-palette"  # the colour of an object no palette colour describes (fails colour clauses)

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels (x2, y2 exclusive)
    area: int


def centre(d: Detection) -> tuple[float, float]:
    """The centre of a detection's box."""
    x0, y0, x1, y1 = d.bbox
    return ((x0 + x1) / 2, (y0 + y1) / 2)


class Checks:
    """Pass / fail checks in order and the reasons of those that fail (the editing and video
    evaluators): ``check(ok, why)`` records one, ``outcome()`` gives (results, reasons or "ok")."""

    def __init__(self) -> None:
        self.results: list[bool] = []
        self.reasons: list[str] = []

    def __call__(self, ok: bool, why: str) -> None:
        self.results.append(bool(ok))
        if not ok:
            self.reasons.append(why)

    def outcome(self) -> tuple[list[bool], str]:
        return self.results, "; ".join(self.reasons) or "ok"


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


def _centred(brightness: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (brightness clipped at 0) and pixel coordinates x, y about their weighted centroid."""
    weights = np.clip(brightness, 0.0, None).astype(np.float64)
    ys, xs = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
    total = max(weights.sum(), 1e-9)
    return weights, xs - (weights * xs).sum() / total, ys - (weights * ys).sum() / total


def squareness(brightness: np.ndarray) -> float:
    """E[x^2 y^2] / E[(x^4 + y^4) / 2] of the brightness about its centroid, x and y each in units
    of their standard deviation: 1/3 for a disc or an axis-aligned ellipse, 5/9 for an axis-aligned
    square or rectangle (a person calls a wide rectangle a square sooner than a circle). Size and
    position do not matter, and every pixel counts, not just the corners."""
    weights, x, y = _centred(brightness)
    total = max(weights.sum(), 1e-9)
    x = x / max(np.sqrt((weights * x**2).sum() / total), 1e-9)
    y = y / max(np.sqrt((weights * y**2).sum() / total), 1e-9)
    return float((weights * x**2 * y**2).sum() / max((weights * (x**4 + y**4)).sum() / 2, 1e-9))


def vertical_skewness(brightness: np.ndarray) -> float:
    """The skewness E[y^3] / E[y^2]^(3/2) of the brightness along y (down): an apex-up triangle's
    mass sits at its base, -0.57 for a sharp one; 0 for anything symmetric top to bottom."""
    weights, _, y = _centred(brightness)
    total = max(weights.sum(), 1e-9)
    spread = max((weights * y**2).sum() / total, 1e-9) ** 1.5
    return float((weights * y**3).sum() / total / spread)


def classify_shape(mask: np.ndarray, brightness: np.ndarray) -> str:
    """Circle, square or triangle from an object's half-maximum mask and its brightness (both
    cropped to the mask's bounding box; brightness divided by the object's peak), by moments of the
    brightness, which use every pixel and hold for rounded and blurred shapes:

    - vertical skewness (:func:`vertical_skewness`) at most TRIANGLE_SKEW: a triangle;
    - else squareness (:func:`squareness`) at least SQUARE_MIN: a square, at most ROUND_MAX: a circle;
    - in between (a blurred square, a boxy circle): the brightness at the box's corners, which a
      square fills and a circle does not (>= 0.24 on average).

    Measured (1st-99th percentiles) on 100 rendered shapes each, sharp and blurred by 0.7 and 1 px:
    skewness of triangles -0.61 to -0.18, of circles and squares -0.07 to 0.07; squareness of
    circles 0.30-0.35, of squares 0.45-0.57 (0.38 at 1 px blur). On the labelled generated images
    (docs/evaluation.md): triangles' skewness -0.55 to -0.18, others' -0.14 to 0.15; squareness of
    circles 0.34-0.49, of squares 0.48-0.57.
    """
    if vertical_skewness(brightness) <= TRIANGLE_SKEW:
        return "triangle"
    square_like = squareness(brightness)
    if square_like >= SQUARE_MIN:
        return "square"
    if square_like <= ROUND_MAX:
        return "circle"
    corners = (brightness[0, 0] + brightness[0, -1] + brightness[-1, 0] + brightness[-1, -1]) / 4
    return "square" if corners >= 0.24 else "circle"


def split_touching(region: np.ndarray) -> list[np.ndarray]:
    """One foreground region as the objects it holds: one mask, unless its outline says it is
    several touching objects.

    The Euclidean distance transform of the region peaks at each object's centre (at its half
    width). Regions are merged from the highest distance down (a persistence computation); when
    two grow into each other, the one with the lower peak p dies at the level d of the neck
    between them. It was an object of its own if the neck is narrow against it, d < NECK_RATIO * p,
    and it is not a speck, p >= MIN_CORE. A shape whose colour drifts has one peak and stays whole.
    The region is then cut between the surviving peaks by a watershed on the distance.
    """
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    height, width = region.shape
    order = sorted(zip(*np.nonzero(region)), key=lambda yx: -distance[yx])
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    peak: dict[tuple[int, int], tuple[int, int]] = {}  # a component's root -> its peak pixel

    def root(p: tuple[int, int]) -> tuple[int, int]:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    significant: list[tuple[int, int]] = []
    for pixel in order:
        parent[pixel] = pixel
        peak[pixel] = pixel
        y, x = pixel
        roots = {root(n) for n in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
                 if n in parent and n != pixel}
        if not roots:
            continue  # a new local maximum
        eldest = max(roots, key=lambda r: distance[peak[r]])
        for other in roots - {eldest}:  # the lower peaks die here, at this pixel's distance
            top = distance[peak[other]]
            if top >= MIN_CORE and distance[pixel] < NECK_RATIO * top:
                significant.append(peak[other])
            parent[other] = eldest
        parent[pixel] = eldest
    significant.append(peak[root(order[0])])  # the highest peak never dies
    if len(significant) == 1:
        return [region]
    # watershed by flooding from the surviving peaks, highest distance first
    labels = np.zeros(region.shape, dtype=np.int32)
    queue = []
    for index, (y, x) in enumerate(significant, start=1):
        labels[y, x] = index
        heapq.heappush(queue, (-distance[y, x], y, x))
    while queue:
        _, y, x = heapq.heappop(queue)
        for ny in range(max(0, y - 1), min(height, y + 2)):
            for nx in range(max(0, x - 1), min(width, x + 2)):
                if region[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = labels[y, x]
                    heapq.heappush(queue, (-distance[ny, nx], ny, nx))
    return [labels == index for index in range(1, len(significant) + 1)]


def _split_region(region: np.ndarray, brightness: np.ndarray) -> list[np.ndarray]:
    """The objects of one foreground region: its half-maximum core (where blurred touching objects
    meet, the neck is dimmer, so narrower) split by :func:`split_touching`, piece by piece (pieces
    under MIN_AREA are specks, not seeds), and every pixel of the region given to the nearest piece."""
    from scipy import ndimage

    core = region & (brightness >= 0.5 * brightness[region].max())
    pieces, count = ndimage.label(core, structure=np.ones((3, 3), dtype=bool))
    seeds = [part for index in range(1, count + 1) if (pieces == index).sum() >= MIN_AREA
             for part in split_touching(pieces == index)]
    if len(seeds) <= 1:
        return [region]
    owner = np.zeros(region.shape, dtype=np.int32)
    for index, seed in enumerate(seeds, start=1):
        owner[seed] = index
    _, (rows, cols) = ndimage.distance_transform_edt(owner == 0, return_indices=True)
    nearest = owner[rows, cols]
    return [region & (nearest == index) for index in range(1, len(seeds) + 1)]


def _hue(rgb: np.ndarray) -> float:
    return colorsys.rgb_to_hsv(*(float(v) for v in rgb))[0] * 360.0


_PALETTE_HUES = np.array([_hue(c) for c in _PALETTE])


def object_color(chroma: np.ndarray) -> str:
    """The colour name of an object from the chromaticity (RGB over its brightest channel) of its
    core pixels: the palette colour nearest in hue to the median's, or OFF_PALETTE when the median
    is pale (saturation below MIN_SATURATION: white, grey, pink) or its hue is more than
    HUE_TOLERANCE degrees from every palette hue (magenta, lime)."""
    median = np.median(chroma.reshape(-1, 3), axis=0)
    if 1.0 - median.min() / max(float(median.max()), 1e-6) < MIN_SATURATION:
        return OFF_PALETTE
    distances = np.abs((_hue(median) - _PALETTE_HUES + 180.0) % 360.0 - 180.0)  # around the hue circle
    nearest = int(distances.argmin())
    return _PALETTE_NAMES[nearest] if distances[nearest] <= HUE_TOLERANCE else OFF_PALETTE


def detect(image: Any) -> list[Detection]:
    """Objects in an image, largest first.

    Objects are found on a 3x3-median-filtered copy (pixel noise gone): foreground components
    (8-connected) regardless of colour, each split only where its outline shows touching objects
    (:func:`split_touching`), never by colour, so a shape whose hue drifts stays one object. Its
    colour comes from the median chromaticity of its core (pixels at least half as bright as its
    brightest): the nearest palette hue or OFF_PALETTE (:func:`object_color`). The shape is measured on the unfiltered
    image (the filter rounds the corners of small squares): the half-maximum mask around the object.
    """
    from scipy import ndimage

    raw = to_numpy_image(image)
    raw_brightness = raw.max(axis=2)
    pixels = ndimage.median_filter(raw, size=(3, 3, 1))
    brightness = pixels.max(axis=2)
    chroma = pixels / np.maximum(brightness, 1e-6)[..., None]
    structure = np.ones((3, 3), dtype=bool)
    components, _ = ndimage.label(brightness > FOREGROUND, structure=structure)
    found: list[Detection] = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        region = components == index
        if region.sum() < MIN_AREA:
            continue
        parts = _split_region(region, brightness)
        for piece in parts:
            if piece.sum() < MIN_AREA:
                continue
            core = piece & (brightness >= 0.5 * brightness[piece].max())
            others = region & ~piece
            around = ndimage.binary_dilation(piece, structure=structure) & ~others
            peak = float(np.percentile(raw_brightness[piece], 90))  # robust to noisy maxima
            mask = around & (raw_brightness >= 0.5 * peak)
            rows, cols = np.nonzero(mask)
            y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            relative = np.where(around, raw_brightness, 0.0)[y0:y1, x0:x1] / peak
            found.append(Detection(
                classify_shape(mask[y0:y1, x0:x1], relative), object_color(chroma[core]),
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
