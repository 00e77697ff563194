"""Per-prompt reward normalisation for policy-gradient methods.

DDPO (Black et al. 2023) keeps, per prompt, a buffer of its last ``buffer_size`` rewards and turns
each new reward into an advantage ``(r - mean) / (std + 1e-6)`` over that buffer, falling back to
the whole batch's statistics while a prompt has fewer than ``min_count`` rewards (its defaults:
16 and 16). ``buffer_size = 0`` keeps no history: the statistics are those of the prompt's group
in the current batch (GRPO's group normalisation, as in Flow-GRPO).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

EPS = 1e-6


class PerPromptStatTracker:
    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if buffer_size < 0 or min_count < 1:
            raise ValueError(f"buffer_size must be >= 0 and min_count >= 1, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Advantages (B,) of ``rewards`` (B,) for ``prompts`` (B); records the rewards."""
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {rewards.shape[0]} rewards")
        values = rewards.detach().float().cpu()
        advantages = torch.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            current = values[index]
            if self.buffer_size:
                buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
                buffer.extend(current.tolist())
                history = torch.tensor(list(buffer))
            else:
                history = current
            if len(history) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = history.mean(), history.std(unbiased=False)
            advantages[index] = (current - mean) / (std + EPS)
        return advantages.to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(b, maxlen=self.buffer_size) for p, b in state["buffers"].items()}
