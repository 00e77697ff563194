"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction) and SD-Turbo (trailing spacing, 1-4 steps)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor

from genalign.core.experiment import BackboneConfig
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.base import DiffusersBackbone


@register("sd")
class StableDiffusionBackbone(DiffusersBackbone):
    """UNet2DConditionModel + AutoencoderKL + one CLIP text encoder.

    The parameterisation (epsilon / v_prediction) comes from the checkpoint's scheduler config,
    as in diffusers (SD 2.x 768 models are v-prediction).
    """
    summary = "Stable Diffusion 1.x / 2.x (UNet, epsilon or v-prediction)"

    pipeline_class: ClassVar[type] = StableDiffusionPipeline

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_sd_pipeline

        return {"sd": lambda prediction_type, seed: tiny_sd_pipeline(prediction_type, False, seed)}

    @classmethod
    def extra_load_kwargs(cls, config: BackboneConfig) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    @torch.no_grad()
    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning:
        prompts = list(prompts)
        # diffusers' own encode_prompt: same tokenisation, truncation and empty-negative handling.
        positive, negative = self.pipe.encode_prompt(
            prompts, self.device, 1, guidance, list(negative_prompts) if negative_prompts else None
        )
        return Conditioning(
            {"prompt_embeds": positive},
            {"prompt_embeds": negative} if guidance else None,
            prompts,
        )

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.denoiser(x, t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]


@register("sd-turbo")
class StableDiffusionTurboBackbone(StableDiffusionBackbone):
    """SD-Turbo: an SD 2.1 model distilled for 1-4 steps; sample with guidance_scale 1."""
    summary = "SD-Turbo: SD 2.1 distilled for 1-4 steps"

    default_timestep_spacing: ClassVar[str | None] = "trailing"
    detected_from_pipeline: ClassVar[bool] = False  # its checkpoints name the base pipeline: --family says so

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_sd_pipeline

        return {"sd-turbo": lambda prediction_type, seed: tiny_sd_pipeline(prediction_type, True, seed)}
