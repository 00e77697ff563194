"""Z-Image (Tongyi-MAI 2025): ZImageTransformer2DModel (single-stream S3-DiT) on the FLUX VAE's
latents, with the second-to-last hidden states of a Qwen3 text model as the prompt (diffusers'
ZImagePipeline).

As the pipeline does it: each prompt goes through the tokenizer's chat template (user turn,
generation prompt) and is padded to ``max_sequence_length`` (512), and only its unpadded states
reach the transformer (a list of variable-length tensors; here kept padded with a ``mask`` in the
conditioning and unpadded in ``_denoise``); sigmas are ``linspace(1, 1/N, N)`` through the
scheduler (``mu`` from the token count where it shifts dynamically); the transformer is given
``1 - sigma`` and predicts the negated velocity, so its output is negated into diffusers' flow
convention (noise - x0). Guidance: genalign's ``w`` is ``uncond + w (cond - uncond)``; the pipeline's
``guidance_scale`` g is ``cond + g (cond - uncond)``, i.e. ``w = g + 1`` (Z-Image's default g = 5 is
w = 6; Z-Image-Turbo runs without guidance, w = 1). The pipeline's ``cfg_normalization`` and
``cfg_truncation`` options are off by default and not reproduced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import ZImagePipeline
from torch import Tensor

from genalign.core.schedules import FlowSchedule, NoiseSchedule
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.base import DiffusersBackbone


@register("zimage")
class ZImageBackbone(DiffusersBackbone):
    summary = "Z-Image / Z-Image-Turbo (single-stream DiT flow matching, Qwen3 prompt states)"
    pipeline_class: ClassVar[type] = ZImagePipeline
    denoiser_component: ClassVar[str] = "transformer"
    latent_patch: ClassVar[int] = 2  # 2x2 latent patches a token, packed here

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_zimage_pipeline

        return {"zimage": lambda prediction_type, seed: tiny_zimage_pipeline(prediction_type, seed)}

    # The attention projections of the refiners and the main layers (diffusers' Z-Image LoRA targets).
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"
    lora_keys_to_diffusers: ClassVar[bool] = False
    t5_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)  # reads max_sequence_length tokens
    default_sequence_length: ClassVar[int] = 512  # the pipeline's default

    @property
    def native_resolution(self) -> int:
        return 1024  # the pipeline's default size

    @property
    def latent_channels(self) -> int:
        return int(self.unwrapped_denoiser.config.in_channels)

    def _make_schedule(self) -> NoiseSchedule:
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        config = self.pipe.scheduler.config
        _, h, w = self.latent_shape()
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return FlowSchedule(config, mu=mu if config.get("use_dynamic_shifting") else None, linspace_sigmas=True)

    @torch.no_grad()
    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning:
        prompts = list(prompts)
        negatives = self._negatives(prompts, negative_prompts, guidance, "")
        states = self.pipe._encode_prompt(prompt=prompts + negatives, device=self.device,
                                          max_sequence_length=self.max_sequence_length)
        longest = max(s.shape[0] for s in states)
        embeds = states[0].new_zeros(len(states), longest, states[0].shape[-1])
        mask = torch.zeros(len(states), longest, dtype=torch.long, device=embeds.device)
        for i, s in enumerate(states):
            embeds[i, : s.shape[0]], mask[i, : s.shape[0]] = s, 1
        rows = len(prompts)
        positive = {"prompt_embeds": embeds[:rows], "mask": mask[:rows]}
        negative = {"prompt_embeds": embeds[rows:], "mask": mask[rows:]} if guidance else None
        return Conditioning(positive, negative, prompts)

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        lengths = cond["mask"].bool().sum(dim=1).tolist()
        captions = [e[:n] for e, n in zip(cond["prompt_embeds"], lengths)]
        sigma = t.to(torch.float32) / 1000
        out = self.denoiser(list(x.unsqueeze(2).unbind(0)), 1 - sigma, captions, return_dict=False)[0]  # fp32, as the pipeline
        return -torch.stack(out).squeeze(2)
