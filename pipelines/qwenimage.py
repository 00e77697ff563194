"""Qwen-Image (Qwen team 2025): QwenImageTransformer2DModel (MMDiT) on 2x2-packed latents of its
Wan-style VAE, with the last hidden states of Qwen2.5-VL as the prompt (diffusers' QwenImagePipeline).

As the pipeline does it: the prompt is wrapped in Qwen-Image's system template and its first 34
tokens dropped, variable-length prompt states are zero-padded with a mask (a positive and a negative
batched together share one padded length; masked tokens are never attended to, and the real tokens'
RoPE positions do not move); sigmas are ``linspace(1, 1/N, N)`` shifted with ``mu`` from the image's
token count (the scheduler's exponential time shift and terminal sigma); the timestep given to the
transformer is sigma (``t / 1000``). Guidance is Qwen-Image's "true CFG" with the norm rescale:
``comb = neg + w (pos - neg)``, then ``comb * ||pos|| / ||comb||`` per packed token, where the
negative prompt is ``" "`` unless given (the pipeline runs CFG only with a negative prompt; its model
card passes ``" "``). Latents stay unpacked (B, C, h, w) outside this file; the VAE's frame axis and
its per-channel ``latents_mean`` / ``latents_std`` normalisation live in ``decode`` / ``encode``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import QwenImagePipeline
from torch import Tensor

from genalign.core.schedules import NoiseSchedule
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.base import DiffusersBackbone

NEGATIVE_PROMPT = " "  # the pipeline's documented empty negative prompt


@register("qwenimage")
class QwenImageBackbone(DiffusersBackbone):
    summary = "Qwen-Image (MMDiT flow matching, Qwen2.5-VL prompt states, true CFG with norm rescale)"
    pipeline_class: ClassVar[type] = QwenImagePipeline
    denoiser_component: ClassVar[str] = "transformer"
    latent_patch: ClassVar[int] = 2  # 2x2 latent patches a token, packed here

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_qwenimage_pipeline

        return {"qwenimage": lambda prediction_type, seed: tiny_qwenimage_pipeline(prediction_type, seed)}

    # The joint-attention projections of both streams, as diffusers' Qwen-Image LoRA script targets them.
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"
    lora_keys_to_diffusers: ClassVar[bool] = False
    t5_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)  # reads max_sequence_length tokens, not its model_max_length
    default_sequence_length: ClassVar[int] = 1024  # the pipeline's tokenizer_max_length (and its cap)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def native_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.unwrapped_denoiser.config.in_channels // 4

    def _make_schedule(self) -> NoiseSchedule:
        return self._token_shift_schedule()

    @torch.no_grad()
    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning:
        prompts = list(prompts)
        negatives = self._negatives(prompts, negative_prompts, guidance, NEGATIVE_PROMPT)
        # one call: positive and negative padded to one length, so that they batch together
        embeds, mask = self.pipe.encode_prompt(prompt=prompts + negatives, device=self.device, num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        rows = len(prompts)
        positive = {"prompt_embeds": embeds[:rows], "mask": mask[:rows]}
        negative = {"prompt_embeds": embeds[rows:], "mask": mask[rows:]} if guidance else None
        return Conditioning(positive, negative, prompts)

    def _denoise_packed(self, packed: Tensor, timestep: Tensor, cond: dict[str, Tensor], h: int, w: int) -> Tensor:
        mask = cond["mask"]
        tokens = packed.shape[1]
        packed, shapes = self._with_context(packed, [(1, h // 2, w // 2)], cond)
        return self.denoiser(
            hidden_states=packed,
            timestep=timestep.to(packed.dtype) / 1000,  # the pipeline's convention: sigma
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=None if bool(mask.bool().all()) else mask,
            img_shapes=[shapes] * packed.shape[0],
            return_dict=False,
        )[0][:, :tokens]

    def _with_context(self, packed: Tensor, shapes: list[tuple[int, int, int]],
                      cond: dict[str, Tensor]) -> tuple[Tensor, list[tuple[int, int, int]]]:
        """The token sequence the transformer reads and its images' ``img_shapes``: the noisy latents'
        alone here; editing models append their source image's (whose outputs are dropped)."""
        return packed, shapes

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        x_t, timestep, positive, dtype = self._inputs(x_t, timestep, cond)
        batch, channels, h, w = x_t.shape
        self._check_schedule_size(h, w)
        packed = self.pipeline_class._pack_latents(x_t, batch, channels, h, w)
        if guidance_scale == 1.0 or cond.negative is None:
            out = self._denoise_packed(packed, timestep, positive, h, w)
        else:
            both = {k: torch.cat([positive[k], cond.negative[k].to(self.device, dtype)]) for k in positive}
            text, uncond = self._denoise_packed(torch.cat([packed, packed]), torch.cat([timestep, timestep]),
                                                both, h, w).chunk(2)
            combined = uncond + guidance_scale * (text - uncond)
            out = combined * (text.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        f = self.vae_scale_factor
        return self.pipeline_class._unpack_latents(out, h * f, w * f, f)[:, :, 0]

    def decode(self, latents: Tensor) -> Tensor:
        images = self._decode_normalised(latents.unsqueeze(2))[:, :, 0]  # one frame
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self._encode_normalised((images * 2 - 1).unsqueeze(2), generator)[:, :, 0].to(self.dtype)
