"""Qwen-Image-Edit (Qwen team 2025): Qwen-Image whose Qwen2.5-VL prompt encoder also sees the source
image, and whose transformer reads the source image's packed latents after the noisy ones (a second
image in ``img_shapes``); only the noisy tokens' outputs are kept. As ``QwenImageEditPipeline``:

- the source image is resized (the pipeline's image processor) to ``calculate_dimensions(1024 * 1024,
  aspect ratio)`` (multiples of 32 near one megapixel; a checkpoint's ``genalign.json``
  ``source_area`` overrides the area), and that image is both what the VLM sees and what the VAE
  encodes (its mode, normalised by ``latents_mean`` / ``latents_std``);
- the instruction goes into the edit template (system turn asking to describe the image and apply
  the instruction, the image in the user turn) whose first 64 tokens are dropped;
- true CFG with the norm rescale as Qwen-Image, the negative prompt (``" "`` unless given) encoded
  with the same source image and the same source tokens; ``mu`` counts the noisy tokens only.

Qwen-Image-Edit-2509 / 2511 (``QwenImageEditPlusPipeline``): :mod:`genalign.pipelines.qwenimage_edit_plus`.
Each prompt's source image comes with ``encode_prompts(images=...)`` or from
``backbone.source_images``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import QwenImageEditPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from torch import Tensor

from genalign.core.images import to_pil_images
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.qwenimage import NEGATIVE_PROMPT, QwenImageBackbone

SOURCE_AREA = 1024 * 1024  # QwenImageEditPipeline.__call__'s target area for the source image


@register("qwenimage-edit")
class QwenImageEditBackbone(QwenImageBackbone):
    summary = "Qwen-Image-Edit (instruction editing: the VLM sees the source, its tokens beside the noisy ones)"
    pipeline_class: ClassVar[type] = QwenImageEditPipeline
    takes_images: ClassVar[bool] = True

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_qwenimage_edit_pipeline

        return {"qwenimage-edit": tiny_qwenimage_edit_pipeline}

    @property
    def source_area(self) -> int:
        return int(self.defaults.get("source_area", SOURCE_AREA))

    @torch.no_grad()
    def _encode_edit(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, guidance: bool,
                     images: Tensor) -> Conditioning:
        prompts = list(prompts)
        negatives = self._negatives(prompts, negative_prompts, guidance, NEGATIVE_PROMPT)
        pictures = to_pil_images(images)
        width, height, _ = calculate_dimensions(self.source_area, pictures[0].width / pictures[0].height)
        resized = [self.pipe.image_processor.resize(picture, height, width) for picture in pictures]
        # positive and negative in one call (padded to one length), each with its source image
        embeds, mask = self.pipe.encode_prompt(prompt=prompts + negatives, image=resized + resized[: len(negatives)],
                                               device=self.device, num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pixels = self.pipe.image_processor.preprocess(resized, height, width)  # (B, 3, H, W) in [-1, 1]
        return self._edit_conditioning(prompts, embeds, mask, pixels, guidance)

    def _edit_conditioning(self, prompts: list[str], embeds: Tensor, mask: Tensor, pixels: Tensor,
                           guidance: bool) -> Conditioning:
        """The prompts' states (then the negatives', when ``guidance``) with the source images' latents:
        ``pixels`` (B, 3, H, W) in [-1, 1] encoded to the VAE's mode, normalised, as the pipeline does."""
        source = self.encode((pixels + 1) / 2)
        rows = len(prompts)
        positive = {"prompt_embeds": embeds[:rows], "mask": mask[:rows], "image_latents": source}
        negative = ({"prompt_embeds": embeds[rows:], "mask": mask[rows:], "image_latents": source} if guidance
                    else None)
        return Conditioning(positive, negative, prompts)

    def _with_context(self, packed: Tensor, shapes: list[tuple[int, int, int]],
                      cond: dict[str, Tensor]) -> tuple[Tensor, list[tuple[int, int, int]]]:
        """The source image's packed tokens after the noisy ones, a second image in ``img_shapes``."""
        source = cond["image_latents"].to(packed.dtype)
        batch, channels, h, w = source.shape
        source_tokens = self.pipeline_class._pack_latents(source, batch, channels, h, w)
        return torch.cat([packed, source_tokens], 1), [*shapes, (1, h // 2, w // 2)]
