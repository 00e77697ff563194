"""The optimizer, LR schedule and EMA of a run's trainable parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from genalign.core.experiment import RunConfig


def make_optimization(run: RunConfig, params: list[torch.nn.Parameter], accelerator: Any) -> tuple[Any, Any, Any]:
    """(optimizer, LR scheduler, EMA or None): AdamW with the run's settings (its fused kernel
    when ``run.fused_adamw`` and :func:`fusable` allow; prepared by ``accelerator``: mixed
    precision's GradScaler), diffusers' named schedule with warm-up, and diffusers' ``EMAModel``
    when ``run.ema``."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=run.lr, betas=run.adam_betas, eps=run.adam_eps,
                                  weight_decay=run.weight_decay,
                                  fused=True if run.fused_adamw and fusable(params) else None)
    prepared = accelerator.prepare(optimizer)
    scheduler = get_scheduler(run.lr_scheduler, optimizer, num_warmup_steps=run.warmup_steps,
                              num_training_steps=run.steps)
    ema = None
    if run.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=run.ema_decay)
    return prepared, scheduler, ema


def fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for ``params``: floating point, all on one kind of
    device that has one (torch's own list; CUDA and CPU in every supported torch). The fused
    update is one kernel for all parameters (measured against torch's default: docs/training.md,
    "Speed")."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch that moved it: the two every version since 2.4 has
        devices = {"cuda", "cpu"}
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= devices and all(torch.is_floating_point(p) for p in params)


@contextmanager
def averaged_weights(ema: Any, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Within this context ``params`` hold the EMA's averaged weights (no-op without an EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
