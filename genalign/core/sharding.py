"""Sharded data parallelism (FSDP) of the denoiser, with torch's ``fully_shard`` (FSDP2).

``accelerate launch`` with an FSDP config (``configs/accelerate/fsdp*.yaml``) asks for it; genalign
reads that config (:func:`plan_from_environment`) and shards the backbone's denoiser itself
(:func:`shard_module`) instead of letting accelerate wrap a model. ``fully_shard`` shards a module
in place: its parameters become ``DTensor`` shards, gathered for each forward and backward by hooks,
and the gradients are reduce-scattered (averaged) across processes. The module object, its class
and its methods stay what they were, so a fine-tuner's calls (LoRA adapters switched off for the
reference, several passes before one backward) go through unchanged.

What the two sharding strategies keep per process (N processes, P parameters):
- ``reshard_after_forward: true`` (FULL_SHARD, ZeRO-3): P/N parameters between passes, the
  gradients and optimizer state of P/N; each backward gathers the parameters again.
- ``reshard_after_forward: false`` (SHARD_GRAD_OP, ZeRO-2): the parameters stay gathered from the
  forward to the backward, the gradients and optimizer state are sharded.

Every process must run the same sequence of denoiser passes in a step (each pass gathers shards
from all of them). The methods do, except on a micro-batch with nothing to train on (D3PO or
online Diffusion-DPO pairs that are all ties, DDPO / Flow-GRPO with every advantage dropped by
``drop_zero_advantage``), where they skip the passes: a process that skips while another does not
would wait at the other's next gather, so under FSDP such a batch raises a clear error instead
(``BackboneMethod.zero_loss``; torchrun then stops the other processes). Continuous rewards and
the default settings make such batches rare; avoid ``min_reward_gap`` and ``drop_zero_advantage``
under FSDP.

Everything written to disk (checkpoints, exported LoRA / denoiser) is gathered to full tensors
first (:func:`gather_full`, every process takes part) so that a checkpoint written by N sharded
processes resumes on N processes sharded or not (the data positions and RNGs are per process);
:func:`shard_like` puts loaded full tensors back into the shards of the parameters they belong to.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ShardingPlan:
    """How to shard: the strategy, and which submodules become their own sharded units."""

    reshard_after_forward: bool = True
    # Module class names sharded as their own units (each gathered only around its own forward);
    # empty: the denoiser's ``_no_split_modules`` (diffusers' transformer / resnet blocks).
    unit_classes: tuple[str, ...] = ()
    cpu_offload: bool = False
    activation_checkpointing: bool = False


def plan_from_environment() -> ShardingPlan | None:
    """The FSDP settings ``accelerate launch`` passed to this process, or None without FSDP.

    Both of accelerate's FSDP versions map onto ``fully_shard``: version 1's FULL_SHARD and
    SHARD_GRAD_OP become ``reshard_after_forward`` true / false. NO_SHARD means plain data
    parallelism (None); HYBRID_SHARD is refused.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1"):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    from genalign.core.config import ConfigError

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version == 2:
        reshard = bool(plugin.reshard_after_forward)
    else:
        strategy = plugin.sharding_strategy or plugin.reshard_after_forward
        name = getattr(strategy, "name", str(strategy)).upper()
        if name == "NO_SHARD":
            return None
        if name not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise ConfigError(
                f"FSDP sharding strategy {name} is not supported; use FULL_SHARD or SHARD_GRAD_OP "
                "(configs/accelerate/fsdp.yaml, fsdp_shard_grad_op.yaml)"
            )
        reshard = name == "FULL_SHARD"
    names = plugin.transformer_cls_names_to_wrap or ()
    return ShardingPlan(
        reshard_after_forward=reshard,
        unit_classes=tuple(n.strip() for n in names if n.strip()),
        cpu_offload=_offloads(plugin.cpu_offload),
        activation_checkpointing=bool(plugin.activation_checkpointing),
    )


def _offloads(setting: Any) -> bool:
    """accelerate's cpu_offload setting: FSDP1's ``CPUOffload(offload_params=...)`` or FSDP2's
    ``CPUOffloadPolicy`` (offloading) / ``OffloadPolicy`` (not)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if hasattr(setting, "offload_params"):
        return bool(setting.offload_params)
    return isinstance(setting, CPUOffloadPolicy) or setting is True


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def any_sharded(tensors: Iterable[Any]) -> bool:
    return any(is_sharded(t) for t in tensors)


def shard_module(module: nn.Module, plan: ShardingPlan) -> int:
    """Shard ``module`` in place over all processes; returns the number of sharded units.

    Every submodule whose class is in the plan's unit classes (default: the module's
    ``_no_split_modules``) becomes a unit, then the module itself (the parameters left over).
    Call it before anything holds on to the module's parameters: sharding replaces them.
    """
    import torch.distributed as dist

    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    except ImportError as err:  # public since torch 2.6
        from genalign.core.config import ConfigError

        raise ConfigError(f"FSDP needs torch >= 2.6 (fully_shard); this is torch {torch.__version__}") from err
    if not dist.is_initialized():
        raise RuntimeError("FSDP needs the process group of `accelerate launch` / torchrun")
    names = set(plan.unit_classes or getattr(module, "_no_split_modules", None) or ())
    found = {type(m).__name__ for m in module.modules()}
    unknown = names - found
    if plan.unit_classes and unknown:
        from genalign.core.config import ConfigError

        raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names classes the denoiser does not have: "
                          f"{sorted(unknown)} (it has e.g. {sorted(found)[:8]})")
    kwargs: dict[str, Any] = {"reshard_after_forward": plan.reshard_after_forward}
    if plan.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    units = [m for m in module.modules() if m is not module and type(m).__name__ in names]
    # Innermost first: a unit nested in another is sharded before its parent takes the rest.
    for unit in reversed(units):
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    module.register_forward_hook(_reshard_after_no_grad_forward)
    return len(units) + 1


def _reshard_after_no_grad_forward(module: nn.Module, args: Any, output: Any) -> None:
    # FSDP2 keeps the root's parameters (and, without reshard_after_forward, every unit's)
    # gathered after a forward, for the backward that usually follows. A forward without
    # gradients (rollouts, sample grids, reference passes) has no backward: gathered copies left
    # behind would cost memory and would not see the next optimizer step.
    if not torch.is_grad_enabled():
        reshard(module)


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit in ``module`` (back to this process's
    shards). Needed before the parameters are changed or read outside a forward/backward."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unsharded_class(module: nn.Module) -> type:
    """The module's own class (``fully_shard`` swaps in a subclass named ``FSDP<class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def is_sharded_module(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def gather_full(value: Any, keep: bool = True) -> Any:
    """``value`` (a tensor or nested dicts / lists / tuples of them) with every DTensor gathered to
    a full CPU tensor. Collective: every process must call it with the same structure. With
    ``keep=False`` (processes that will not write) the gathered tensors are dropped as they come."""
    if is_sharded(value):
        full = value.full_tensor()
        return full.cpu() if keep else None
    if isinstance(value, dict):
        return {k: gather_full(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        gathered = [gather_full(v, keep) for v in value]
        return gathered if isinstance(value, list) else tuple(gathered)
    return value


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full tensor loaded from disk, as the shard that ``like`` (a parameter, possibly a DTensor)
    holds on this process; plain tensors pass through (moved to ``like``'s device and dtype)."""
    if is_sharded(like):
        from torch.distributed.tensor import distribute_tensor

        local = like.to_local()
        return distribute_tensor(value.to(device=local.device, dtype=like.dtype), like.device_mesh,
                                 like.placements, src_data_rank=None)
    return value.to(device=like.device, dtype=like.dtype)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a gathered (full) state: the per-parameter state
    tensors shaped like a sharded parameter become that parameter's shards."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == param.shape:
                    state[key] = shard_like(value, param)


def main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (differentiable), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor
