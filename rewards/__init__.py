"""Reward-model adapters, one file each, fitting ``genalign.core.types.Reward``.

The adapters themselves arrive with the rewards issue; this module holds their registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig

REWARDS: dict[str, Any] = {}


def load_rewards(configs: Sequence[RewardConfig], device: str | torch.device = "cpu") -> list[Any]:
    """Instantiate the configured rewards (name -> adapter factory), in config order."""
    out = []
    for config in configs:
        if config.name not in REWARDS:
            raise ConfigError(
                f"unknown reward.name {config.name!r}; available: {', '.join(sorted(REWARDS)) or 'none yet'}"
            )
        out.append(REWARDS[config.name](config, device))
    return out
