"""FLUX.1 [dev] / [schnell]: FluxTransformer2DModel on 2x2-packed latents, CLIP-L pooled + T5 tokens.

Latents stay unpacked (B, C, h, w) everywhere outside this file, so the generic sampler and every
fine-tuner treat FLUX like any other backbone; packing and the latent image ids happen in
``predict``. ``guidance_scale`` is the distilled guidance that [dev] embeds (FLUX has no
classifier-free guidance by default; [schnell] ignores it); fine-tuners of [dev] should pass the
guidance they sample with (diffusers' FLUX scripts train at 3.5), not the contract's default 1. Sigmas are placed as the FLUX pipeline
places them: ``linspace(1, 1/N, N)`` shifted with ``mu`` from the image's token count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import FluxPipeline
from torch import Tensor

from genalign.core.schedules import NoiseSchedule
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.base import DiffusersBackbone


@register("flux")
class FluxBackbone(DiffusersBackbone):
    summary = "FLUX.1 [dev] / [schnell] (flow matching, guidance-distilled)"
    pipeline_class: ClassVar[type] = FluxPipeline
    denoiser_component: ClassVar[str] = "transformer"
    latent_patch: ClassVar[int] = 2  # 2x2 latent patches a token, packed here

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        """[dev]-style (guidance embedding) and [schnell]-style (none) tiny models."""
        from genalign.pipelines.tiny import tiny_flux_pipeline

        return {"flux": lambda prediction_type, seed: tiny_flux_pipeline(prediction_type, seed, guidance_embeds=True),
                "flux-schnell": lambda prediction_type, seed: tiny_flux_pipeline(prediction_type, seed,
                                                                                 guidance_embeds=False)}
    # Attention projections of the double- and single-stream blocks (diffusers' FLUX LoRA script).
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"
    lora_keys_to_diffusers: ClassVar[bool] = False
    # T5 tokens: 512 for [dev], 256 for [schnell] (as diffusers' FLUX docs and BFL's code use them)
    t5_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer_2",)
    t5_tokens_dev: ClassVar[int] = 512
    t5_tokens_schnell: ClassVar[int] = 256

    @property
    def native_resolution(self) -> int:
        return self.pipe.vae.config.sample_size

    @property
    def latent_channels(self) -> int:
        return self.unwrapped_denoiser.config.in_channels // 4

    @property
    def guidance_embedded(self) -> bool:
        """FLUX [dev] embeds its guidance scale; [schnell] has no guidance input."""
        return bool(self.unwrapped_denoiser.config.guidance_embeds)

    def _make_schedule(self) -> NoiseSchedule:
        return self._token_shift_schedule()

    @torch.no_grad()
    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning:
        prompts = list(prompts)
        longest = self.max_sequence_length or (
            self.t5_tokens_dev if self.guidance_embedded else self.t5_tokens_schnell
        )
        max_length = min(longest, self.pipe.tokenizer_2.model_max_length)
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1, max_sequence_length=max_length
        )
        # text ids are (L, 3) for the whole batch; kept per row so that Conditioning.select works
        text_ids = text_ids.unsqueeze(0).expand(len(prompts), -1, -1)
        return Conditioning({"prompt_embeds": embeds, "pooled": pooled, "text_ids": text_ids}, None, prompts)

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        x_t, timestep, positive, dtype = self._inputs(x_t, timestep, cond)
        batch, channels, h, w = x_t.shape
        self._check_schedule_size(h, w)
        packed = self.pipeline_class._pack_latents(x_t, batch, channels, h, w)
        image_ids = self.pipeline_class._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, dtype)
        tokens = packed.shape[1]
        packed, image_ids = self._with_context(packed, image_ids, positive)
        guidance = None
        if self.guidance_embedded:
            guidance = torch.full((batch,), float(guidance_scale), device=self.device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=packed,
            timestep=timestep.to(dtype) / 1000,  # the FLUX pipeline's convention: sigma, in the latents' dtype
            guidance=guidance,
            pooled_projections=positive["pooled"],
            encoder_hidden_states=positive["prompt_embeds"],
            txt_ids=positive["text_ids"][0],
            img_ids=image_ids,
            return_dict=False,
        )[0][:, :tokens]
        f = self.vae_scale_factor
        return self.pipeline_class._unpack_latents(out, h * f, w * f, f)

    def _with_context(self, packed: Tensor, image_ids: Tensor, positive: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The token sequence the transformer reads and its ids: the noisy latents' alone here; editing
        models append their source image's (whose outputs are dropped)."""
        return packed, image_ids
