"""Stable Diffusion XL and SDXL-Turbo: two text encoders, pooled embeddings, size/crop time ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionXLPipeline
from torch import Tensor

from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.base import DiffusersBackbone


@register("sdxl")
class StableDiffusionXLBackbone(DiffusersBackbone):
    """SDXL base. ``time_ids`` are (orig_h, orig_w, crop_top, crop_left, target_h, target_w) with
    original = target = ``backbone.resolution`` and no crop, as the SDXL pipeline does by default
    (set ``backbone.resolution`` to sample at another square size)."""
    summary = "Stable Diffusion XL (UNet, two text encoders)"

    pipeline_class: ClassVar[type] = StableDiffusionXLPipeline

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_sdxl_pipeline

        return {"sdxl": lambda prediction_type, seed: tiny_sdxl_pipeline(prediction_type, False, seed)}

    @torch.no_grad()
    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning:
        prompts = list(prompts)
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guidance,
            negative_prompt=list(negative_prompts) if negative_prompts else None,
        )
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=embeds.dtype)
        time_ids = time_ids.expand(len(prompts), -1)
        positive = {"prompt_embeds": embeds, "pooled": pooled, "time_ids": time_ids}
        negative = {"prompt_embeds": neg_embeds, "pooled": neg_pooled, "time_ids": time_ids} if guidance else None
        return Conditioning(positive, negative, prompts)

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return self.denoiser(
            x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added, return_dict=False
        )[0]


@register("sdxl-turbo")
class StableDiffusionXLTurboBackbone(StableDiffusionXLBackbone):
    """SDXL-Turbo: adversarially distilled SDXL for 1-4 steps at guidance_scale 1."""
    summary = "SDXL-Turbo: SDXL distilled for 1-4 steps"

    default_timestep_spacing: ClassVar[str | None] = "trailing"
    detected_from_pipeline: ClassVar[bool] = False  # its checkpoints name the base pipeline: --family says so

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_sdxl_pipeline

        return {"sdxl-turbo": lambda prediction_type, seed: tiny_sdxl_pipeline(prediction_type, True, seed)}
