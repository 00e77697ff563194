"""Training data sources: what the trainer draws each micro-batch from, shuffled per epoch,
sharded across processes, and checkpointed by position.

The items are whatever a method collects from: prompts (``run.prompts``, the default), or the
method's own data (``FineTuner.training_data``: dataset row indices, labelled pair ids), handed to
``collect`` as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class DataSource:
    """Cycles through the training items in a fresh seeded permutation each epoch.

    Each process reads its own interleaved shard (rank, rank + world, ...); the position is part of
    the checkpoint.
    """

    def __init__(self, items: Sequence[Any], seed: int, rank: int = 0, world_size: int = 1):
        if not items:
            raise ValueError("the data source needs at least one item (a prompt, a row, a pair)")
        self.items = list(items)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation (global, all ranks)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=generator).tolist()

    def next(self, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            for _rank in range(self.world_size):
                if self.position >= len(self._order):
                    self.epoch += 1
                    self.position = 0
                    self._order = self._permutation(self.epoch)
                if _rank == self.rank:
                    out.append(self.items[self._order[self.position]])
                self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


PromptSource = DataSource  # the name it had while it held prompts only
