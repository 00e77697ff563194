"""The accelerate ``Accelerator`` of a run, and the collective checks every process makes
together."""

from __future__ import annotations

import os
from typing import Any

import torch

from genalign.core.experiment import RunConfig

UNSUPPORTED_ENGINES = ("DEEPSPEED", "MEGATRON_LM")


def make_accelerator(run: RunConfig) -> Any:
    """The accelerate ``Accelerator`` of a run (precision, tracker, project folder).

    Without CUDA it is told ``cpu=True``: only then does accelerate pick up the process group of
    ``torchrun`` / ``accelerate launch --multi_gpu`` on CPU machines (gloo). An FSDP launch config is
    genalign's to apply (``genalign.core.sharding.plan_from_environment``; ``run_experiment`` shards
    the denoiser), so accelerate itself is started as plain multi-process and wraps nothing.
    """
    from accelerate import Accelerator

    fsdp_flag = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        accelerator = Accelerator(
            mixed_precision=run.mixed_precision,
            log_with=None if run.tracker == "none" else run.tracker,
            project_dir=str(run.output_dir),
            cpu=not torch.cuda.is_available(),
        )
    finally:
        if fsdp_flag is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp_flag
    check_distributed_type(str(accelerator.distributed_type))
    return accelerator


def check_distributed_type(distributed_type: str) -> None:
    """DeepSpeed and Megatron wrap the model in their own engines, which the trainer does not do;
    such a config is refused with what to use instead, rather than silently running unsharded."""
    name = distributed_type.rsplit(".", 1)[-1]
    if name in UNSUPPORTED_ENGINES:
        from genalign.core.config import ConfigError

        raise ConfigError(
            f"accelerate is configured for {name}, which genalign's trainer does not support (it does not hand "
            "the model to an engine). For ZeRO-2 (sharded gradients and optimizer state) launch with "
            "configs/accelerate/fsdp_shard_grad_op.yaml, for ZeRO-3 with configs/accelerate/fsdp.yaml, or plain "
            "data parallelism with ddp_1node.yaml / ddp_multinode.yaml"
        )


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (so that all skip or stop together)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0)
