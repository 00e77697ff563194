"""Reward-model adapters, one file each, fitting ``genalign.core.types.Reward``: images
(B, 3, H, W) in [0, 1] + prompts (+ metadata) -> one score per image (higher is better) and named
sub-scores; ``differentiable`` says whether gradients reach the pixels.

Select them by name from a config: ``reward: {name: pickscore}`` or a list for a weighted sum;
``{name: ensemble, options: {aggregate: worst, members: [...]}}`` for conservative ensembles.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.rewards.base import RewardModel

REWARDS: dict[str, Any] = {}
# rewards that live outside rewards/ (which may import only genalign.core): name -> the module
# that registers it, imported on first use
ELSEWHERE = {"shapes_gold": "genalign.shapes.reward"}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make an adapter (a class with ``from_config(config, device)``) selectable."""

    def add(cls: type) -> type:
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = cls
        return cls

    return add


def load_reward(config: RewardConfig, device: str | torch.device = "cpu") -> RewardModel:
    """One adapter from its config."""
    if config.name not in REWARDS and config.name in ELSEWHERE:
        importlib.import_module(ELSEWHERE[config.name])
    if config.name not in REWARDS:
        available = ", ".join(sorted({*REWARDS, *ELSEWHERE}))
        raise ConfigError(f"unknown reward.name {config.name!r}; available: {available}")
    return REWARDS[config.name].from_config(config, device)


def load_rewards(configs: Sequence[RewardConfig], device: str | torch.device = "cpu") -> list[RewardModel]:
    """Instantiate the configured rewards, in config order."""
    return [load_reward(config, device) for config in configs]


def build_reward(configs: Sequence[RewardConfig], device: str | torch.device = "cpu") -> RewardModel:
    """The single reward a fine-tuner optimises: the one configured, or the weighted sum of several."""
    from genalign.rewards.combine import WeightedSum

    if not configs:
        available = ", ".join(sorted({*REWARDS, *ELSEWHERE}))
        raise ConfigError(f"no reward configured: set reward.name (available: {available})")
    rewards = load_rewards(configs, device)
    if len(rewards) == 1 and configs[0].weight == 1.0:
        return rewards[0]
    return WeightedSum(rewards, [c.weight for c in configs])


# adapters register themselves on import (their heavy imports happen when a model is loaded)
from genalign.rewards import (  # noqa: E402
    aesthetic,
    clip,
    combine,
    compressibility,
    geneval,
    hps,
    image_reward,
    pickscore,
    vlm,
)

__all__ = ["REWARDS", "RewardModel", "build_reward", "load_reward", "load_rewards", "register"]
del aesthetic, clip, combine, compressibility, geneval, hps, image_reward, pickscore, vlm
