"""FLUX.1 Kontext [dev] (Black Forest Labs 2025, "FLUX.1 Kontext: Flow Matching for In-Context Image
Generation and Editing"): FLUX.1 [dev]'s transformer reading the source image's packed latents after
the noisy ones, their position ids offset to index 1 in the first axis; only the noisy tokens'
outputs are kept. As ``FluxKontextPipeline``: the source latents are the VAE's mode, shifted and
scaled; the sigma shift ``mu`` counts the noisy tokens only; ``guidance_scale`` is the embedded
(distilled) guidance (the pipeline's default 3.5; the model card's examples use 2.5).

The source image is used at its own size (a multiple of 16 pixels); the pipeline's optional resize to
Kontext's preferred resolutions (``_auto_resize``) is left to the data. Prompts are edit
instructions; each one's source image comes with ``encode_prompts(images=...)`` or from
``backbone.source_images`` (see ``DiffusersBackbone.set_source_images``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import FluxKontextPipeline
from torch import Tensor

from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.flux import FluxBackbone


@register("flux-kontext")
class FluxKontextBackbone(FluxBackbone):
    summary = "FLUX.1 Kontext [dev] (instruction editing: source image tokens beside the noisy ones)"
    pipeline_class: ClassVar[type] = FluxKontextPipeline
    takes_images: ClassVar[bool] = True

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_flux_kontext_pipeline

        return {"flux-kontext": tiny_flux_kontext_pipeline}

    @torch.no_grad()
    def _encode_edit(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, guidance: bool,
                     images: Tensor) -> Conditioning:
        height, width = images.shape[-2:]
        if height % self.latent_multiple or width % self.latent_multiple:
            raise ValueError(f"source images of {height}x{width} pixels: Kontext packs them, so both sides must be "
                             f"multiples of {self.latent_multiple}")
        cond = self._encode_prompts(prompts, negative_prompts, guidance)
        cond.positive["image_latents"] = self.encode(images)  # the VAE's mode, as the pipeline ("argmax")
        return cond

    def _with_context(self, packed: Tensor, image_ids: Tensor, positive: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        source = positive["image_latents"]
        batch, channels, h, w = source.shape
        source_ids = self.pipeline_class._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, packed.dtype)
        source_ids[..., 0] = 1  # the pipeline: the latents' ids with the first axis set to 1
        source_tokens = self.pipeline_class._pack_latents(source.to(packed.dtype), batch, channels, h, w)
        return torch.cat([packed, source_tokens], 1), torch.cat([image_ids, source_ids], 0)
