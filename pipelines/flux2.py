"""FLUX.2 [dev] and [klein] (Black Forest Labs 2025-26): Flux2Transformer2DModel on the FLUX.2 VAE's
patchified, batch-norm-normalised latents, with three layers of the text model side by side as
the prompt (diffusers' Flux2Pipeline: Mistral Small 3.1 behind its processor, layers 10, 20, 30;
Flux2KleinPipeline: Qwen3, layers 9, 18, 27; a checkpoint's ``genalign.json`` may say otherwise).

As the pipelines do it: each prompt goes through the chat template ([dev]: with FLUX.2's system
message; [klein]: thinking off) and is padded to ``max_sequence_length`` (512), and the chosen layers'
states are concatenated per token, with 4-D (t, h, w, l) text and image position ids; the flow runs
on the VAE latents cut into 2x2 patches and normalised by the VAE's batch-norm running statistics,
which is this backbone's latent space ``(B, 4C, H / 16, W / 16)`` (``decode`` / ``encode`` undo and
apply it); sigmas are ``linspace(1, 1/N, N)`` shifted with FLUX.2's empirical ``mu``, a function of
the token count and of N (training timesteps use the mu of the pipelines' default 50 steps); the
transformer is given sigma. Guidance: [dev] is guidance-distilled and embeds ``guidance_scale`` (no
CFG; train with the guidance you sample with, 4 in the pipeline); [klein] base uses plain CFG with the
negative prompt ``""``; a step-distilled [klein] (``is_distilled``) takes none, as its pipeline ignores it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from torch import Tensor

from genalign.core.schedules import FlowSchedule, NoiseSchedule
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.base import DiffusersBackbone


@register("flux2")
class Flux2Backbone(DiffusersBackbone):
    summary = "FLUX.2 [dev] (flow matching, guidance-distilled, Mistral Small 3.1 prompt states)"
    pipeline_class: ClassVar[type] = Flux2Pipeline
    denoiser_component: ClassVar[str] = "transformer"
    latent_patch: ClassVar[int] = 2  # 2x2 latent patches a token, packed here
    text_encoder_out_layers: ClassVar[tuple[int, ...]] = (10, 20, 30)  # the pipeline's default

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_flux2_pipeline

        return {"flux2": lambda prediction_type, seed: tiny_flux2_pipeline(prediction_type, seed)}

    # The double-stream blocks' attention projections and MLPs and the single-stream blocks' fused
    # input projection (Flow-Factory's FLUX.2 targets).
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "linear_in",
        "linear_out", "to_qkv_mlp_proj",
    )
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"
    lora_keys_to_diffusers: ClassVar[bool] = False
    t5_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)  # reads max_sequence_length tokens
    default_sequence_length: ClassVar[int] = 512

    @property
    def out_layers(self) -> tuple[int, ...]:
        return tuple(self.defaults.get("text_encoder_out_layers", self.text_encoder_out_layers))

    @property
    def native_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unwrapped_denoiser.config.in_channels)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        height, width = height or self.resolution, width or self.resolution
        f = self.latent_multiple
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of {f} (VAE factor x 2x2 patches)")
        return (self.latent_channels, height // f, width // f)

    def _make_schedule(self) -> NoiseSchedule:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        config = self.pipe.scheduler.config
        _, h, w = self.latent_shape()
        tokens = h * w
        return FlowSchedule(config, mu=lambda steps: compute_empirical_mu(tokens, steps),
                            linspace_sigmas=not config.get("use_flow_sigmas", False))

    @torch.no_grad()
    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning:
        prompts = list(prompts)
        guidance = guidance and self.takes_cfg
        negatives = self._negatives(prompts, negative_prompts, guidance, "")
        embeds, text_ids = self.pipe.encode_prompt(prompt=prompts + negatives, device=self.device,
                                                   max_sequence_length=self.max_sequence_length,
                                                   text_encoder_out_layers=self.out_layers)
        rows = len(prompts)
        positive = {"prompt_embeds": embeds[:rows], "text_ids": text_ids[:rows]}
        negative = {"prompt_embeds": embeds[rows:], "text_ids": text_ids[rows:]} if guidance else None
        return Conditioning(positive, negative, prompts)

    @property
    def guidance_embedded(self) -> bool:
        """[dev] embeds its guidance scale; [klein] has no guidance input."""
        return bool(self.unwrapped_denoiser.config.guidance_embeds)

    @property
    def takes_cfg(self) -> bool:
        """Classifier-free guidance: [klein] base only (not a guidance-embedding or step-distilled model)."""
        return not self.guidance_embedded and not self.pipe.config.get("is_distilled", False)

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        if self.guidance_embedded:
            x_t, timestep, positive, _ = self._inputs(x_t, timestep, cond)
            return self._denoise(x_t, timestep, positive, torch.full((x_t.shape[0],), float(guidance_scale)))
        return super().predict(x_t, timestep, cond, guidance_scale if self.takes_cfg else 1.0)

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        batch, channels, h, w = x.shape
        out = self.denoiser(
            hidden_states=self.pipeline_class._pack_latents(x),  # (B, h w, C), row-major as the ids
            timestep=t.to(x.dtype) / 1000,
            guidance=None if guidance is None else guidance.to(self.device, torch.float32),
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"].long(),
            img_ids=self.pipeline_class._prepare_latent_ids(x).to(x.device),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(batch, channels, h, w)

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean, std = self._bn_stats(latents)
        images = vae.decode(self.pipeline_class._unpatchify_latents(latents * std + mean), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        vae = self.pipe.vae
        dist = vae.encode((images * 2 - 1).to(self.device, vae.dtype)).latent_dist
        latents = self.pipeline_class._patchify_latents(dist.mode() if generator is None else dist.sample(generator))
        mean, std = self._bn_stats(latents)
        return ((latents - mean) / std).to(self.dtype)


@register("flux2-klein")
class Flux2KleinBackbone(Flux2Backbone):
    summary = "FLUX.2 [klein] (flow matching, Qwen3 prompt states, CFG unless step-distilled)"
    pipeline_class: ClassVar[type] = Flux2KleinPipeline
    text_encoder_out_layers: ClassVar[tuple[int, ...]] = (9, 18, 27)

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_flux2_klein_pipeline

        return {"flux2-klein": lambda prediction_type, seed: tiny_flux2_klein_pipeline(prediction_type, seed)}
