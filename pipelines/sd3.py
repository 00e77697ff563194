"""Stable Diffusion 3 / 3.5: SD3Transformer2DModel (MMDiT), CLIP-L + CLIP-G (+ optional T5-XXL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusion3Pipeline
from torch import Tensor

from genalign.core.experiment import BackboneConfig
from genalign.core.schedules import FlowSchedule, NoiseSchedule
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.base import DiffusersBackbone, absent_components


@register("sd3")
class StableDiffusion3Backbone(DiffusersBackbone):
    """Flow matching with a static ``shift`` (3.0 for SD3/3.5), classifier-free guidance.

    Prompt embeddings are the CLIP-L/CLIP-G penultimate states padded to T5's width and joined
    with T5's (zeros when the checkpoint is loaded without T5, as diffusers does); the pooled
    projection is the two CLIPs' pooled outputs side by side.
    """
    summary = "Stable Diffusion 3 / 3.5 (MMDiT flow matching)"

    pipeline_class: ClassVar[type] = StableDiffusion3Pipeline
    denoiser_component: ClassVar[str] = "transformer"

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_sd3_pipeline

        return {"sd3": lambda prediction_type, seed: tiny_sd3_pipeline(prediction_type, seed)}
    # The joint-attention projections of both streams (image and context), as diffusers' SD3
    # DreamBooth-LoRA script targets them.
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"
    lora_keys_to_diffusers: ClassVar[bool] = False

    @classmethod
    def extra_load_kwargs(cls, config: BackboneConfig) -> dict[str, Any]:
        if config.drop_t5 or "text_encoder_3" in absent_components(config.path):
            return {"text_encoder_3": None, "tokenizer_3": None}
        return {}

    def _make_schedule(self) -> NoiseSchedule:
        return FlowSchedule(self.pipe.scheduler.config)

    @torch.no_grad()
    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning:
        prompts = list(prompts)
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guidance,
            negative_prompt=list(negative_prompts) if negative_prompts else None,
            **({"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}),
        )
        positive = {"prompt_embeds": embeds, "pooled": pooled}
        negative = {"prompt_embeds": neg_embeds, "pooled": neg_pooled} if guidance else None
        return Conditioning(positive, negative, prompts)

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.denoiser(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]
