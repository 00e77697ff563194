"""One training run from an experiment config, as ``genalign train`` runs it (and as a Python
user calls it): the accelerator, the backbone (sharded under an FSDP launch), the reward, the
method, the trainer; and the line that loads the result in diffusers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from genalign.core.sharding import local_part, plan_from_environment


def run_experiment(config: Any, resume: str | None = None) -> Any:
    """Train ``config`` (an ``Experiment`` from ``load_experiment``); ``resume``: ``"latest"`` or a
    checkpoint folder. Returns the trainer's result; prints progress and the diffusers load line on
    the main process."""
    from accelerate.utils import set_seed

    from genalign.core.speed import set_tf32, set_threads
    from genalign.core.trainer import Trainer, make_accelerator
    from genalign.finetuners import METHODS

    run = config.run
    set_threads(run.threads)
    set_tf32(run.tf32)
    accelerator = make_accelerator(run)
    set_seed(run.seed)  # LoRA and head initialisations draw from the global RNGs
    backbone = None
    if config.backbone.path:
        from genalign.pipelines import load_backbone

        backbone = load_backbone(config.backbone, accelerator.device)
        shard_if_asked(backbone, accelerator)
    reward = None
    if config.reward:
        from genalign.rewards import build_reward

        reward = build_reward(config.reward, accelerator.device)
        if backbone is not None and backbone.takes_images:  # editing: rewards see each prompt's source image
            from genalign.rewards.combine import WithSourceImages

            reward = WithSourceImages(reward, backbone.source_images)
    method = METHODS.get(config.method_name)
    finetuner = method.build(config, backbone, reward, **method_encoders(config, accelerator.device))
    items = finetuner.training_data()  # the method's own data, e.g. offline pairs
    if not items:  # an editing model's instructions default to those of its backbone.source_images
        edits = list(backbone.source_images) if backbone is not None and backbone.takes_images else []
        items = edits if edits and not (run.prompts or run.prompt_file) else run.load_prompts()
    trainer = Trainer(finetuner, run, config.sample, items, resolved_config=config.to_dict(),
                      accelerator=accelerator)
    result = trainer.train(resume=resume)
    accelerator.print(f"done: {result.steps_done} steps ({result.skipped_steps} skipped); outputs in {result.output_dir}")
    if accelerator.is_main_process and backbone is not None:
        line = load_instructions(config.backbone.path, Path(result.output_dir) / "final")
        if line:
            accelerator.print(f"load it in diffusers:\n  {line}")
    if torch.distributed.is_initialized():  # leave together; gloo's threads abort an exit that skips this
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def method_encoders(config: Any, device: Any) -> dict[str, Any]:
    """The image-text encoder a value-based method's config names (``encoder_key``, e.g. VARD's
    ``value_encoder``) when its value inputs are ``encoder``: loaded here, where rewards may be
    imported, and handed to the method's ``build``."""
    from genalign.finetuners import METHODS

    key = getattr(METHODS.get(config.method_name), "encoder_key", None)
    if key is None or getattr(config.method, key.replace("_encoder", "_inputs"), None) != "encoder":
        return {}
    from genalign.core.experiment import RewardConfig
    from genalign.rewards.clip import load_encoder

    path = getattr(config.method, key)
    return {"encoder": load_encoder(RewardConfig(name="clip", path=path), device, path)}


def shard_if_asked(backbone: Any, accelerator: Any) -> None:
    """FSDP (an accelerate launch config with ``distributed_type: FSDP``): shard the denoiser."""
    plan = plan_from_environment()
    if plan is None:
        return
    if accelerator.num_processes == 1:
        accelerator.print("FSDP asked for with one process: nothing to shard, training unsharded")
        return
    units = backbone.shard(plan)
    strategy = "FULL_SHARD" if plan.reshard_after_forward else "SHARD_GRAD_OP"
    params = list(backbone.unwrapped_denoiser.parameters())
    held, total = sum(local_part(p).numel() for p in params), sum(p.numel() for p in params)
    accelerator.print(f"FSDP ({strategy}): denoiser sharded over {accelerator.num_processes} processes in {units} "
                      f"units; this process holds {held} of its {total} parameters")


def load_instructions(base: str, final: Path) -> str | None:
    """The one line of Python that loads a run's exported weights into a diffusers pipeline."""
    if (final / "pytorch_lora_weights.safetensors").is_file():
        return (f'from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained("{base}"); '
                f'pipe.load_lora_weights("{final}")')
    denoiser = final / "denoiser"
    if (denoiser / "config.json").is_file():
        cls = json.loads((denoiser / "config.json").read_text()).get("_class_name", "UNet2DConditionModel")
        part = "unet" if "UNet" in cls else "transformer"
        return (f'from diffusers import DiffusionPipeline, {cls}; pipe = DiffusionPipeline.from_pretrained("{base}", '
                f'{part}={cls}.from_pretrained("{denoiser}"))')
    return None
