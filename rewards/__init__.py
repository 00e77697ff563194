"""Reward-model adapters, one file each, fitting ``genalign.core.types.Reward``: images
(B, 3, H, W) in [0, 1] + prompts (+ metadata) -> one score per image (higher is better) and named
sub-scores; ``differentiable`` says whether gradients reach the pixels. Videos (B, F, 3, H, W) are
scored frame by frame by image adapters (``reward.frames``, ``reward.frame_reduce``) and whole by the
temporal ones (``rewards/video.py``).

Select them by name from a config: ``reward: {name: pickscore}`` or a list for a weighted sum;
``{name: ensemble, options: {aggregate: worst, members: [...]}}`` for conservative ensembles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.core.registry import Registry
from genalign.rewards.base import RewardModel

# every adapter module here (and the shapes world's reward) that calls ``register("name")`` is found
# without importing it and imported on first use
REWARDS: Registry[RewardModel] = Registry("reward.name", decorator="genalign.rewards.register", packages=["genalign.rewards"],
                   modules=["genalign.shapes.reward"])


def register(name: str) -> Callable[[type[RewardModel]], type[RewardModel]]:
    """Class decorator: make an adapter (a class with ``from_config(config, device)``) selectable."""
    return REWARDS.register(name)


def load_reward(config: RewardConfig, device: str | torch.device = "cpu") -> RewardModel:
    """One adapter from its config (with its frame choice for videos)."""
    reward = REWARDS.get(config.name).from_config(config, device)
    if config.frames is not None or config.frame_reduce != "mean":
        if reward.takes_video:
            raise ConfigError(f"reward {config.name} scores whole videos: reward.frames / frame_reduce do not apply")
        reward.frames, reward.frame_reduce = config.frames, config.frame_reduce
    return reward


def load_rewards(configs: Sequence[RewardConfig], device: str | torch.device = "cpu") -> list[RewardModel]:
    """Instantiate the configured rewards, in config order."""
    return [load_reward(config, device) for config in configs]


def build_reward(configs: Sequence[RewardConfig], device: str | torch.device = "cpu") -> RewardModel:
    """The single reward a fine-tuner optimises: the one configured, or the weighted sum of several."""
    from genalign.rewards.combine import WeightedSum

    if not configs:
        raise ConfigError(f"no reward configured: set reward.name (available: {', '.join(REWARDS.names())})")
    rewards = load_rewards(configs, device)
    if len(rewards) == 1 and configs[0].weight == 1.0:
        return rewards[0]
    return WeightedSum(rewards, [c.weight for c in configs])


__all__ = ["REWARDS", "RewardModel", "build_reward", "load_reward", "load_rewards", "register"]
