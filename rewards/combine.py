"""Rewards made of rewards: weighted sums (e.g. ReNO's mix) and ensembles with the conservative
aggregations of Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization":
mean, worst-case (WCO: the minimum over members) and uncertainty-weighted (UWO: the mean minus
lambda times the variance across members).

Config: a list under ``reward:`` is a weighted sum; ``{name: ensemble, options: {aggregate: worst,
members: [{name: clip, ...}, {name: pickscore}], member_stats: [[mean, std], ...]}}`` an ensemble
(members standardised by ``member_stats`` first, as the paper normalises each reward model);
``{name: reno}`` ReNO's mix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from genalign.core.config import ConfigError, from_dict
from genalign.core.experiment import RewardConfig
from genalign.core.types import scored_elsewhere
from genalign.rewards import load_reward, register
from genalign.rewards.base import Metadata, RewardModel, check_inputs

AGGREGATES = ("mean", "worst", "uncertainty")

# ReNO (Eyring et al. 2024), the paper's default mix and weights (HPSv2 5.0, ImageReward 1.0,
# CLIP 0.01, PickScore 0.05), as rewards; its CLIP is the transformers CLIP-ViT-H-14 laion2B.
RENO_MIX = (
    ("hps", 5.0, None),
    ("image_reward", 1.0, None),
    ("clip", 0.01, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    ("pickscore", 0.05, None),
)


def _merge_subscores(into: dict[str, Tensor], sub: Mapping[str, Tensor], device: torch.device) -> None:
    for key, value in sub.items():
        name, n = key, 2
        while name in into:  # two members of the same kind keep both sub-scores
            name, n = f"{key}_{n}", n + 1
        into[name] = value.to(device)


class WeightedSum(RewardModel):
    """``sum_i w_i * reward_i``; sub-scores are every member's own (unweighted) scores."""

    name = "weighted_sum"

    def __init__(self, rewards: Sequence[RewardModel], weights: Sequence[float]):
        if not rewards or len(rewards) != len(weights):
            raise ValueError(f"a weighted sum needs one weight per reward; got {len(rewards)} rewards, {len(weights)} weights")
        super().__init__(rewards[0].device)
        self.rewards, self.weights = list(rewards), [float(w) for w in weights]
        self.differentiable = all(r.differentiable for r in rewards)  # type: ignore[misc]

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[Tensor, dict[str, Tensor]]:
        check_inputs(images, prompts, metadata)
        total = torch.zeros(images.shape[0], device=images.device)
        subscores: dict[str, Tensor] = {}
        for reward, weight in zip(self.rewards, self.weights):
            scores, sub = reward(images, prompts, metadata)
            total = total + weight * scores.to(images.device)
            _merge_subscores(subscores, sub, images.device)
        subscores[self.name] = total
        return total, subscores


class Ensemble(RewardModel):
    """Aggregate K rewards of the same target: ``mean``, ``worst`` (min over members, WCO) or
    ``uncertainty`` (mean - lambda * population variance over members, UWO). Members are first
    standardised with ``member_stats`` [(mean, std)] when given, so their scales agree."""
    summary = "mean / worst-case / uncertainty-weighted aggregate of several rewards"

    name = "ensemble"

    def __init__(self, rewards: Sequence[RewardModel], aggregate: str = "mean", uncertainty_weight: float = 0.5,
                 member_stats: Sequence[Sequence[float]] | None = None):
        if len(rewards) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(rewards)}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"ensemble aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if member_stats is not None and (len(member_stats) != len(rewards) or any(len(s) != 2 or s[1] <= 0 for s in member_stats)):
            raise ValueError("member_stats needs one [mean, std > 0] per member")
        if uncertainty_weight < 0:
            raise ValueError(f"uncertainty_weight must be >= 0, got {uncertainty_weight}")
        super().__init__(rewards[0].device)
        self.rewards, self.aggregate, self.uncertainty_weight = list(rewards), aggregate, float(uncertainty_weight)
        self.member_stats = [tuple(map(float, s)) for s in member_stats] if member_stats else None
        self.differentiable = all(r.differentiable for r in rewards)  # type: ignore[misc]

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> Ensemble:
        options = dict(config.options)
        members = options.pop("members", None)
        if not isinstance(members, list) or not members:
            raise ConfigError(f"reward {config.name}: options.members must be a list of reward mappings")
        configs = [from_dict(RewardConfig, m, "reward.options", f"members[{i}].") for i, m in enumerate(members)]
        unknown = set(options) - {"aggregate", "uncertainty_weight", "member_stats"}
        if unknown:
            raise ConfigError(f"reward {config.name}: unknown option(s) {sorted(unknown)}")
        return cls([load_reward(c, device) for c in configs], **options)

    def member_scores(self, images: Tensor, prompts: Sequence[str],
                      metadata: Metadata = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Each member's scores, standardised by ``member_stats`` where given: (K, B), with the members'
        own subscores merged (what the aggregate is taken over)."""
        check_inputs(images, prompts, metadata)
        subscores: dict[str, Tensor] = {}
        members = []
        for i, reward in enumerate(self.rewards):
            scores, sub = reward(images, prompts, metadata)
            _merge_subscores(subscores, sub, images.device)
            scores = scores.to(images.device)
            if self.member_stats:
                mean, std = self.member_stats[i]
                scores = (scores - mean) / std
            members.append(scores)
        return torch.stack(members), subscores

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[Tensor, dict[str, Tensor]]:
        stacked, subscores = self.member_scores(images, prompts, metadata)  # (K, B)
        mean = stacked.mean(0)
        variance = stacked.var(0, unbiased=False)
        subscores["ensemble_mean"], subscores["ensemble_variance"] = mean, variance
        if self.aggregate == "mean":
            total = mean
        elif self.aggregate == "worst":
            total = stacked.min(0).values
        else:
            total = mean - self.uncertainty_weight * variance
        subscores[self.name] = total
        return total, subscores


register("ensemble")(Ensemble)


@register("reno")
class RenoMix(WeightedSum):
    """ReNO's default reward mix; ``options.weights`` ({hps: 5.0, ...}) overrides weights and
    ``options.paths`` ({clip: ...}) the members' weights locations."""
    summary = "ReNO's reward mix: HPSv2, ImageReward, CLIP, PickScore"

    name = "reno"

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> RenoMix:
        options: dict[str, Any] = dict(config.options)
        weights, paths = dict(options.pop("weights", {})), dict(options.pop("paths", {}))
        if options or set(weights) - {n for n, _, _ in RENO_MIX} or set(paths) - {n for n, _, _ in RENO_MIX}:
            raise ConfigError(f"reward {config.name}: options are weights and paths keyed by {[n for n, _, _ in RENO_MIX]}")
        members, member_weights = [], []
        for name, weight, path in RENO_MIX:
            member = RewardConfig(name=name, path=paths.get(name, path), dtype=config.dtype,
                                  gradient_checkpointing=config.gradient_checkpointing)
            members.append(load_reward(member, device))
            member_weights.append(float(weights.get(name, weight)))
        return cls(members, member_weights)


class WithSourceImages(RewardModel):
    """The reward of an editing model's run: each metadata row gets its prompt's ``source_image``
    ((3, H, W) in [0, 1], the image the instruction edits, from the backbone), so that a reward can
    compare before and after (e.g. ``vlm_compare`` with ``reference: source_image``); rows that carry
    one keep theirs. Scores, sub-scores and differentiability are the wrapped reward's."""

    name = "with_source_images"

    def __init__(self, reward: RewardModel, source_images: Mapping[str, Tensor]):
        super().__init__(reward.device)
        self.reward, self.source_images = reward, source_images
        self.differentiable = reward.differentiable  # type: ignore[misc]
        self.overlaps = scored_elsewhere(reward)

    @property
    def label(self) -> str:
        return self.reward.label

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[
            Tensor, dict[str, Tensor]]:
        rows = [dict(row) for row in metadata] if metadata is not None else [{} for _ in prompts]
        for row, prompt in zip(rows, prompts):
            if "source_image" not in row and prompt in self.source_images:
                row["source_image"] = self.source_images[prompt]
        return self.reward(images, prompts, rows)
