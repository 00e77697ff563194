"""The object-detector contract shared by GenEval, T2I-CompBench and the detector rewards.

A detector turns images into :class:`Detection` lists. It lives wherever its model does
(transformers detectors in ``genalign.rewards.detection``, the shapes world's exact parser in
``genalign.shapes``) and is handed to the scorers as an object, so that ``eval`` and ``rewards``
keep importing only ``genalign.core``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Detection:
    """One detected object: class ``label``, confidence ``score`` in [0, 1], ``box`` (x1, y1, x2, y2)
    in pixels of the image it was found in, optional instance ``mask`` (H, W) bool, and ``color``
    where the detector itself knows the object's colour (the shapes world); otherwise colours come
    from a :class:`ColorClassifier`."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    color: str | None = None

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"label": self.label, "score": round(float(self.score), 5),
                               "box": [round(float(v), 2) for v in self.box]}
        if self.color is not None:
            row["color"] = self.color
        return row


class Detector(Protocol):
    """``detect(images, labels)``: per image (PIL RGB), its detections of any class, or of
    ``labels`` only (open-vocabulary detectors use them as text queries; closed-vocabulary ones
    filter their classes). ``classes``: the closed vocabulary, or None when open."""

    classes: Sequence[str] | None

    def detect(self, images: Sequence[Any], labels: Sequence[str] | None = None) -> list[list[Detection]]: ...


class ColorClassifier(Protocol):
    """``classify(image, detections, classname)``: one colour name per detection (GenEval's colour
    check; ``classname`` enters the zero-shot templates)."""

    def classify(self, image: Any, detections: Sequence[Detection], classname: str) -> list[str]: ...


def box_iou(box_a: Sequence[float], box_b: Sequence[float], inclusive: bool = False) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes. ``inclusive`` counts pixel
    coordinates as mmdetection / GenEval do (a box spans x2 - x1 + 1 pixels)."""
    extra = 1.0 if inclusive else 0.0

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + extra, 0.0) * max(box[3] - box[1] + extra, 0.0)

    inner = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inner
    return inner / union if union > 0 else 0.0


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight (x1, y1, x2, y2) box of a boolean mask, x2/y2 exclusive; (0, 0, 0, 0) when empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
