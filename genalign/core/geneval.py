"""GenEval's scoring rules as pure functions over detections (Ghosh et al. 2023, djghosh13/geneval,
evaluation/evaluate_images.py and summary_scores.py), shared by the GenEval benchmark
(``genalign.eval.geneval``), the GenEval reward and the shapes world's exact evaluator.

- Objects of a class: detections above the confidence threshold (0.3; 0.9 for the counting task),
  most confident first, at most 16 per class, optionally de-duplicated by box IoU (GenEval's
  ``max_overlap``, off by default).
- ``include`` clauses (ANDed): the first ``count`` objects of the class must exist, all have the
  clause's colour (checked by a colour classifier on only those objects) and stand in the clause's
  relation to every object of the referenced earlier clause (:func:`relative_position`).
- ``exclude`` clauses: fail when ``count`` or more objects of the class are present.
- Summary: per-task accuracy over images, overall = mean of the task accuracies, plus the share of
  correct images and of prompts with at least one correct image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genalign.core.detection import ColorClassifier, Detection, box_iou

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")

ColorFn = Callable[[Sequence[Detection], str], list[str]]


@dataclass(frozen=True)
class GenEvalOptions:
    """GenEval's ``--options`` with its defaults."""

    threshold: float = 0.3  # detection confidence kept (strictly above)
    counting_threshold: float = 0.9  # ... for the counting task
    max_objects: int = 16  # per class, most confident first
    max_overlap: float = 1.0  # IoU above which a less confident box of the class is dropped; 1 = off
    position_threshold: float = 0.1  # share of the summed box sizes ignored in relative positions

    def __post_init__(self) -> None:
        for name in ("threshold", "counting_threshold", "max_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"GenEval option {name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_objects < 1 or self.position_threshold < 0:
            raise ValueError("GenEval options: max_objects must be >= 1 and position_threshold >= 0")


def check_metadata(meta: Any) -> None:
    """A metadata row in GenEval's format, or a ValueError naming what is wrong."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"a GenEval metadata row is a JSON object, got {type(meta).__name__}")
    for key in ("tag", "prompt"):
        if not isinstance(meta.get(key), str):
            raise ValueError(f"GenEval metadata needs a string {key!r}: {dict(meta)}")
    for section in ("include", "exclude"):
        clauses = meta.get(section, [])
        if not isinstance(clauses, list):
            raise ValueError(f"GenEval metadata {section!r} must be a list of clauses, got {clauses!r}")
        for i, clause in enumerate(clauses):
            if not isinstance(clause, Mapping) or not isinstance(clause.get("class"), str) \
                    or not isinstance(clause.get("count"), int) or isinstance(clause.get("count"), bool) \
                    or clause["count"] < 1:
                raise ValueError(f"{section} clause {i} needs 'class' (str) and 'count' (int >= 1): {clause}")
            if section == "include" and "color" in clause and not isinstance(clause["color"], str):
                raise ValueError(f"include clause {i}: 'color' must be a string, got {clause['color']!r}")
            if section == "include" and "position" in clause:
                position = clause["position"]
                if not (isinstance(position, (list, tuple)) and len(position) == 2 and position[0] in RELATIONS
                        and isinstance(position[1], int) and 0 <= position[1] < i):
                    raise ValueError(f"include clause {i}: position must be [one of {RELATIONS}, an earlier "
                                     f"clause index], got {position}")


def select_objects(detections: Sequence[Detection], tag: str,
                   options: GenEvalOptions = GenEvalOptions()) -> dict[str, list[Detection]]:
    """{class: its kept detections, most confident first} (GenEval's ``evaluate_image``)."""
    threshold = options.counting_threshold if tag == "counting" else options.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        ordered = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[: options.max_objects]
        chosen: list[Detection] = []
        while ordered:
            best = ordered.pop(0)
            chosen.append(best)
            if options.max_overlap < 1.0:
                ordered = [d for d in ordered if box_iou(best.box, d.box, inclusive=True) < options.max_overlap]
        if chosen:
            kept[label] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Relations of box A to box B: the centre offset, each axis shrunk by ``threshold`` x the summed
    box sizes, divided by the full offset's length; beyond 0.5 on an axis names a relation
    (x right, y down: dy < -0.5 is 'above')."""
    a, b = np.asarray(box_a[:4], dtype=np.float64), np.asarray(box_b[:4], dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def detector_colors(detections: Sequence[Detection], classname: str) -> list[str]:
    """Colours from the detections themselves (detectors that know them, like the shapes parser)."""
    if any(d.color is None for d in detections):
        raise ValueError(f"detections of {classname!r} carry no colour: give a colour classifier")
    return [str(d.color) for d in detections]


def color_function(image: Any, classifier: ColorClassifier | None) -> ColorFn:
    """The colour function of the rules for one image: the classifier's on that image, or the
    detections' own colours when there is no classifier."""
    if classifier is None:
        return detector_colors
    return lambda detections, classname: classifier.classify(image, detections, classname)


@dataclass(frozen=True)
class Verdict:
    correct: bool  # every clause holds (GenEval's ``correct``)
    clauses: tuple[bool, ...]  # include clauses then exclude clauses
    reason: str  # why not, GenEval's wording, one line per failed clause

    @property
    def fraction(self) -> float:
        """Share of clauses satisfied (the GenEval reward)."""
        return sum(self.clauses) / len(self.clauses) if self.clauses else 1.0


def evaluate(objects: Mapping[str, Sequence[Detection]], meta: Mapping[str, Any],
             colors: ColorFn = detector_colors, position_threshold: float = 0.1) -> Verdict:
    """GenEval's ``evaluate``: the verdict on one image's ``objects`` (from :func:`select_objects`)
    for one metadata row. ``colors(detections, classname)`` names each detection's colour; it is
    only called for the objects a colour clause checks."""
    results: list[bool] = []
    reasons: list[str] = []
    groups: list[Sequence[Detection] | None] = []
    for clause in meta.get("include", []):
        name, count = clause["class"], clause["count"]
        found = list(objects.get(name, []))[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                named = colors(found, name)
                if named.count(clause["color"]) < count:
                    matched = False
                    others = ", ".join(f"{named.count(c)} {c}" for c in dict.fromkeys(named))
                    reasons.append(f"expected {clause['color']} {name}>={count}, found "
                                   f"{named.count(clause['color'])} {clause['color']}; and {others}")
            if matched and "position" in clause:
                relation, target = clause["position"]
                targets = groups[target]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        wrong = next((rels for t in targets
                                      if relation not in (rels := relative_position(obj.box, t.box, position_threshold))),
                                     None)
                        if wrong is not None:
                            matched = False
                            reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(wrong))} target")
                            break
        results.append(matched)
        groups.append(found if matched else None)
    for clause in meta.get("exclude", []):
        present = len(objects.get(clause["class"], []))
        results.append(present < clause["count"])
        if present >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {present}")
    return Verdict(all(results), tuple(results), "\n".join(reasons))


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """GenEval's summary of result rows (``tag``, ``correct``, ``metadata``): per-task accuracy in
    order of first appearance, ``overall`` = their mean, ``correct_images``, ``correct_prompts``
    (share of distinct metadata rows with at least one correct image), and the counts."""
    if not rows:
        raise ValueError("no GenEval results to summarise")
    per_task: dict[str, list[bool]] = {}
    per_prompt: dict[str, bool] = {}
    for row in rows:
        per_task.setdefault(row["tag"], []).append(bool(row["correct"]))
        key = row["metadata"] if isinstance(row["metadata"], str) else json.dumps(row["metadata"])
        per_prompt[key] = per_prompt.get(key, False) or bool(row["correct"])
    tasks = {task: float(np.mean(values)) for task, values in per_task.items()}
    return {
        "benchmark": "geneval",
        "tasks": tasks,
        "overall": float(np.mean(list(tasks.values()))),
        "correct_images": float(np.mean([bool(r["correct"]) for r in rows])),
        "correct_prompts": float(np.mean(list(per_prompt.values()))),
        "images": len(rows),
        "prompts": len(per_prompt),
    }
