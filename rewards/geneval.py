"""GenEval as a reward (registered as ``geneval``): the share of the prompt's GenEval clauses an
image satisfies (``score: clauses``, the default; a dense signal: "two dogs and a red cup" with
the dogs right but the cup blue scores 1/2), or GenEval's all-clauses-hold 0/1 (``strict``).
Both are sub-scores (``geneval_clauses``, ``geneval_strict``). Not differentiable.

Needs GenEval metadata rows (``tag``, ``include``, ``exclude``) for every image; the rules are
GenEval's own (genalign.core.geneval), the detector Mask2Former (default) or OWLv2 and the colour
classifier CLIP ViT-L/14, as in the benchmark. Options: ``detector`` (mask2former | owlv2),
``detector_path``, ``clip_path``, ``score``, ``threshold``, ``counting_threshold``, and for
Mask2Former ``shortest_edge`` / ``longest_edge`` (GenEval's test scale 800 / 1333 by default; lower
is cheaper during training and no longer the benchmark's setting).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from genalign.core.detection import ColorClassifier, Detector
from genalign.core.experiment import RewardConfig
from genalign.core.geneval import GenEvalOptions, check_metadata, color_function, evaluate, select_objects
from genalign.core.images import to_pil_images
from genalign.rewards import register
from genalign.rewards.base import Metadata, RewardModel, check_options

OPTIONS = ("detector", "detector_path", "clip_path", "score", "threshold", "counting_threshold", "shortest_edge",
           "longest_edge")


@register("geneval")
class GenEvalReward(RewardModel):
    summary = "share of the prompt's GenEval clauses a detector finds satisfied (needs GenEval metadata)"
    name = "geneval"
    differentiable = False

    def __init__(self, detector: Detector, color_classifier: ColorClassifier | None = None, score: str = "clauses",
                 options: GenEvalOptions = GenEvalOptions(), device: str | torch.device = "cpu"):
        if score not in ("clauses", "strict"):
            raise ValueError(f"geneval: options.score must be 'clauses' or 'strict', got {score!r}")
        super().__init__(device)
        self.detector, self.color_classifier, self.mode, self.options = detector, color_classifier, score, options

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> GenEvalReward:
        from genalign.rewards.detection import load_color_classifier, load_detector

        check_options(config.name, config.options, OPTIONS)
        opts: dict[str, Any] = dict(config.options)
        scale: dict[str, Any] = {k: int(opts[k]) for k in ("shortest_edge", "longest_edge") if k in opts}
        detector = load_detector(opts.get("detector", "mask2former"), opts.get("detector_path") or config.path,
                                 device, **scale)
        colors = load_color_classifier(opts.get("clip_path"), device)
        thresholds = {k: float(opts[k]) for k in ("threshold", "counting_threshold") if k in opts}
        return cls(detector, colors, opts.get("score", "clauses"), GenEvalOptions(**thresholds), device)

    def verdicts(self, images: Tensor, metadata: Metadata) -> list[Any]:
        if metadata is None:
            raise ValueError("the geneval reward needs GenEval metadata rows (tag, include, exclude) for every image")
        pil = to_pil_images(images)
        found = self.detector.detect(pil)
        results = []
        for image, dets, meta in zip(pil, found, metadata):
            check_metadata(meta)
            results.append(evaluate(select_objects(dets, meta["tag"], self.options), meta,
                                    color_function(image, self.color_classifier), self.options.position_threshold))
        return results

    def score_with_subscores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[
            Tensor, dict[str, Tensor]]:
        verdicts = self.verdicts(images, metadata)
        clauses = torch.tensor([v.fraction for v in verdicts])
        strict = torch.tensor([float(v.correct) for v in verdicts])
        return clauses if self.mode == "clauses" else strict, {"geneval_clauses": clauses, "geneval_strict": strict}
