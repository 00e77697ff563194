"""Statistics over the whole data-parallel batch.

With N processes each samples its own part of a batch. Whatever a method computes *across* the
batch (GRPO's group means and the batch std, DDPO's per-prompt stat tracker, running reward
statistics) must see every process's samples, or N processes compute something else than one
process with the whole batch. Both official codes gather first (ddpo-pytorch and flow_grpo:
``accelerator.gather`` of rewards and prompt ids, the statistics on the gathered batch, then each
process keeps its own rows): :func:`gather_batch` does that. Without an initialised process group
(one process) every helper is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def world_size() -> int:
    """Processes in the default process group (1 when none is initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_batch(prompts: Sequence[str], values: Tensor) -> tuple[list[str], Tensor, slice]:
    """Every process's ``prompts`` and ``values`` (B,), concatenated in rank order, and the slice of
    this process's rows in them. Processes may hold different counts; every process must call it.
    Values come back as float32 on CPU, bit-for-bit."""
    import torch.distributed as dist

    if len(prompts) != values.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {values.shape[0]} values")
    local = values.detach().float().cpu()
    if world_size() == 1:
        return list(prompts), local, slice(0, len(prompts))
    parts: list[tuple[list[str], list[float]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (list(prompts), local.tolist()))
    all_prompts: list[str] = []
    all_values: list[float] = []
    start = 0
    for rank, part in enumerate(parts):
        assert part is not None
        if rank == dist.get_rank():
            start = len(all_prompts)
        all_prompts.extend(part[0])
        all_values.extend(part[1])
    return all_prompts, torch.tensor(all_values, dtype=torch.float32), slice(start, start + len(prompts))


def mean_over_processes(value: Tensor) -> Tensor:
    """``value``, in place, made the mean of its copies over data-parallel processes (itself with
    one process)."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def average_gradients_across_processes(module: nn.Module) -> None:
    """A model trained outside the trainer (a value head): average its gradients over processes
    (each collects its own shard of the batch)."""
    for param in module.parameters():
        if param.grad is not None:
            mean_over_processes(param.grad)
