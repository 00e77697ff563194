"""The shapes world's exact evaluator as a reward (registered as ``shapes_gold``).

Score: ``clauses`` (default), the fraction of the prompt's GenEval clauses the image satisfies
(the GenEval detector reward, with the world's exact detector in place of Mask2Former), or
``strict``, GenEval's all-clauses-hold 0/1. Both are sub-scores. Metadata rows in GenEval format
may be passed; otherwise the prompt is looked up among the world's prompts. Not differentiable.

Training on it is training on the gold score itself (an upper bound for the proxy-reward runs).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from genalign.core.experiment import RewardConfig
from genalign.rewards import register
from genalign.rewards.base import Metadata, RewardModel, check_options
from genalign.shapes.evaluator import check_clauses
from genalign.shapes.world import all_prompts


@functools.cache
def _metadata_by_prompt() -> dict[str, dict[str, Any]]:
    return {meta["prompt"]: meta for meta in all_prompts()}


@register("shapes_gold")
class ShapesGold(RewardModel):
    summary = "the shapes world's exact evaluator: share of GenEval clauses satisfied"
    name = "shapes_gold"
    differentiable = False

    def __init__(self, score: str = "clauses", device: str | torch.device = "cpu"):
        if score not in ("clauses", "strict"):
            raise ValueError(f"shapes_gold: options.score must be 'clauses' or 'strict', got {score!r}")
        super().__init__(device)
        self.mode = score

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> ShapesGold:
        check_options(config.name, config.options, ("score",))
        return cls(config.options.get("score", "clauses"), device)

    def _clauses(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[Tensor, Tensor]:
        known = _metadata_by_prompt()
        if metadata is None:
            missing = [p for p in prompts if p not in known]
            if missing:
                raise ValueError(f"shapes_gold: no metadata given and {missing[:3]} are not shapes-world prompts")
            metadata = [known[p] for p in prompts]
        pixels = images.detach().float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        fractions, strict = [], []
        for image, meta in zip(pixels, metadata):
            results, _ = check_clauses(image, dict(meta))
            fractions.append(sum(results) / max(len(results), 1))
            strict.append(float(all(results)))
        return torch.tensor(fractions), torch.tensor(strict)

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        fractions, strict = self._clauses(images, prompts, metadata)
        return (fractions if self.mode == "clauses" else strict).to(images.device)

    def __call__(self, images: Tensor, prompts: Any, metadata: Metadata = None) -> tuple[Tensor, dict[str, Tensor]]:
        scores, sub = super().__call__(images, prompts, metadata)
        fractions, strict = self._clauses(images, list(prompts), metadata)
        sub.update({"shapes_clauses": fractions.to(scores.device), "shapes_strict": strict.to(scores.device)})
        return scores, sub


@register("shapes_edit_gold")
class ShapesEditGold(RewardModel):
    """The editing task's exact evaluator (:func:`genalign.shapes.editing.edit_checks`): the share of
    the edit's checks that hold (``options.score: strict``: all of them), judged against each row's
    ``metadata["source_image"]`` (what runs of editing backbones pass). Not differentiable."""

    summary = "the shapes editing task's exact evaluator: edit applied, nothing else changed"
    name = "shapes_edit_gold"
    differentiable = False

    def __init__(self, score: str = "checks", device: str | torch.device = "cpu"):
        if score not in ("checks", "strict"):
            raise ValueError(f"shapes_edit_gold: options.score must be 'checks' or 'strict', got {score!r}")
        super().__init__(device)
        self.mode = score

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> ShapesEditGold:
        check_options(config.name, config.options, ("score",))
        return cls(config.options.get("score", "checks"), device)

    def _scores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[Tensor, Tensor]:
        from genalign.shapes.editing import edit_score

        if metadata is None or any("source_image" not in row for row in metadata):
            raise ValueError("shapes_edit_gold needs each row's metadata 'source_image' (runs of editing backbones "
                             "add it)")
        shares, strict = [], []
        for image, prompt, row in zip(images.detach().float().cpu(), prompts, metadata):
            share, ok = edit_score(image, row["source_image"], prompt)
            shares.append(share)
            strict.append(float(ok))
        return torch.tensor(shares), torch.tensor(strict)

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        shares, strict = self._scores(images, prompts, metadata)
        return (shares if self.mode == "checks" else strict).to(images.device)

    def __call__(self, images: Tensor, prompts: Any, metadata: Metadata = None) -> tuple[Tensor, dict[str, Tensor]]:
        scores, sub = super().__call__(images, prompts, metadata)
        shares, strict = self._scores(images, list(prompts), metadata)
        sub.update({"edit_checks": shares.to(scores.device), "edit_strict": strict.to(scores.device)})
        return scores, sub
