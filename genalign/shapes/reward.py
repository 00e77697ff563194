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


class ExactReward(RewardModel):
    """An exact evaluator as a reward: ``scores`` gives each image's share of checks and its strict
    verdict; ``options.score`` picks which one is the reward (both are sub-scores)."""

    differentiable = False
    modes: tuple[str, str] = ("share", "strict")  # the option's names of the share and of the strict verdict
    sub_names: tuple[str, str] = ("share", "strict")

    def __init__(self, score: str | None = None, device: str | torch.device = "cpu"):
        score = score or self.modes[0]
        if score not in self.modes:
            raise ValueError(f"{self.name}: options.score must be {' or '.join(map(repr, self.modes))}, got {score!r}")
        super().__init__(device)
        self.mode = score

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> ExactReward:
        check_options(config.name, config.options, ("score",))
        return cls(config.options.get("score"), device)

    def scores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[Tensor, Tensor]:
        """(share of the checks that hold, all of them hold) per image."""
        raise NotImplementedError

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        return self.score_with_subscores(images, prompts, metadata)[0]

    def score_with_subscores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[
            Tensor, dict[str, Tensor]]:
        shares, strict = (s.to(images.device) for s in self.scores(images, prompts, metadata))
        chosen = shares if self.mode == self.modes[0] else strict
        return chosen, {self.sub_names[0]: shares, self.sub_names[1]: strict}


@register("shapes_gold")
class ShapesGold(ExactReward):
    summary = "the shapes world's exact evaluator: share of GenEval clauses satisfied"
    name = "shapes_gold"
    modes = ("clauses", "strict")
    sub_names = ("shapes_clauses", "shapes_strict")

    def scores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[Tensor, Tensor]:
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


@register("shapes_edit_gold")
class ShapesEditGold(ExactReward):
    """The editing task's exact evaluator (:func:`genalign.shapes.editing.edit_checks`): the share of
    the edit's checks that hold (``options.score: strict``: all of them), judged against each row's
    ``metadata["source_image"]`` (what runs of editing backbones pass)."""

    summary = "the shapes editing task's exact evaluator: edit applied, nothing else changed"
    name = "shapes_edit_gold"
    modes = ("checks", "strict")
    sub_names = ("edit_checks", "edit_strict")

    def scores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[Tensor, Tensor]:
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


@register("shapes_text_gold")
class ShapesTextGold(ExactReward):
    """The text task's exact reader (:func:`genalign.shapes.text.text_score`): 1 - the normalised
    edit distance of the digits read to the prompt's quoted digits (``options.score: strict``: the
    reading is exactly right); the target may be given as ``metadata["text"]``. The gold of the OCR
    reward's runs on ``models/shapes/text``."""

    summary = "the shapes text task's exact reader: 1 - normalised edit distance to the quoted digits"
    name = "shapes_text_gold"
    modes = ("characters", "strict")
    sub_names = ("text_characters", "text_strict")

    def scores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[Tensor, Tensor]:
        from genalign.shapes.text import check_text, text_of, text_score

        rows: list[Any] = list(metadata) if metadata is not None else [{}] * len(prompts)
        shares, strict = [], []
        for image, prompt, row in zip(images.detach().float().cpu(), prompts, rows):
            share, ok = text_score(image, check_text(str(row["text"])) if row.get("text") else text_of(prompt))
            shares.append(share)
            strict.append(float(ok))
        return torch.tensor(shares), torch.tensor(strict)


@register("shapes_video_gold")
class ShapesVideoGold(ExactReward):
    """The moving-shapes world's exact evaluator (:func:`genalign.shapes.video.video_checks`) on
    videos (B, F, 3, H, W): the share of the prompt's five checks that hold (one object, its shape,
    its colour(s), the motion or the colour change, smoothly / in place); ``options.score: strict``:
    all of them. The gold of the video runs on ``models/shapes/video``."""

    summary = "the moving-shapes world's exact evaluator: shape, colour, direction and smoothness per video"
    name = "shapes_video_gold"
    takes_video = True
    modes = ("checks", "strict")
    sub_names = ("video_checks", "video_strict")

    def scores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[Tensor, Tensor]:
        from genalign.shapes.video import video_score

        shares, strict = [], []
        for video, prompt in zip(images.detach().float().cpu(), prompts):
            share, ok = video_score(video, prompt)
            shares.append(share)
            strict.append(float(ok))
        return torch.tensor(shares), torch.tensor(strict)
