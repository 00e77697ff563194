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
from typing import Any

import torch
from torch import Tensor


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


def average_gradients(params: Sequence[Tensor]) -> None:
    """DDP's gradient averaging for parameters trained outside a DDP wrapper: one all-reduce of
    every gradient flattened together (a missing gradient counts as zeros, so every process reduces
    the same tensor); the identity with one process."""
    import torch.distributed as dist

    if world_size() == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
        offset += grad.numel()


def clip_gradients(params: Sequence[Tensor], max_norm: float, accelerator: Any = None) -> float:
    """Clip the gradients of ``params`` to ``max_norm`` (0: no bound) and return their norm before
    clipping. Through ``accelerator`` when given (it unscales fp16 gradients first). Sharded
    (DTensor) gradients' norm is the norm of the full gradient."""
    from genalign.core.sharding import is_sharded

    bound = max_norm or float("inf")
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        if accelerator is not None:
            return float(accelerator.clip_grad_norm_(params, bound))
        return float(torch.nn.utils.clip_grad_norm_(params, bound))
    if accelerator is not None:
        accelerator.unscale_gradients()
    groups = [[g for g in grads if is_sharded(g)], [g for g in grads if not is_sharded(g)]]
    squares = []
    for group in groups:
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            squares.append((norm.full_tensor() if is_sharded(norm) else norm).float() ** 2)
    total = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    scale = bound / (total + 1e-6)  # torch's clip_grad_norm_ formula
    # In place on each shard (torch.nn.utils.clip_grads_with_norm_ was seen to leave DTensor gradients unscaled).
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return total
