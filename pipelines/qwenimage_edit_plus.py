"""Qwen-Image-Edit-2509 / 2511 (``QwenImageEditPlusPipeline``), one source image a prompt: as
Qwen-Image-Edit (:mod:`genalign.pipelines.qwenimage_edit`), with the Plus pipeline's two differences:

- the VLM sees the source resized to ``calculate_dimensions(384 * 384, aspect ratio)`` (a
  checkpoint's ``genalign.json`` ``condition_area`` overrides it), while the VAE encodes it at
  ``calculate_dimensions(1024 * 1024, ...)`` (``source_area``), each resized by the pipeline's image
  processor;
- the user turn names it: ``"Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + prompt`` (the
  same system turn, its first 64 tokens dropped).

The pipeline encodes one prompt a call (given a list of images, it gives every prompt all of them as
Picture 1, 2, ...): so does this backbone, row by row, padding the rows to one length with the mask.
Several source images a prompt (the Plus models' multi-image editing) are not covered: the contract's
``source_images`` holds one image a prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from torch import Tensor

from genalign.core.images import to_pil_images
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.qwenimage import NEGATIVE_PROMPT
from genalign.pipelines.qwenimage_edit import QwenImageEditBackbone

CONDITION_AREA = 384 * 384  # QwenImageEditPlusPipeline's CONDITION_IMAGE_SIZE: what its VLM sees


@register("qwenimage-edit-plus")
class QwenImageEditPlusBackbone(QwenImageEditBackbone):
    summary = "Qwen-Image-Edit-2509 / 2511 (one source image a prompt; the VLM sees it at 384 x 384)"
    pipeline_class: ClassVar[type] = QwenImageEditPlusPipeline

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        from genalign.pipelines.tiny import tiny_qwenimage_edit_plus_pipeline

        return {"qwenimage-edit-plus": tiny_qwenimage_edit_plus_pipeline}

    @property
    def condition_area(self) -> int:
        return int(self.defaults.get("condition_area", CONDITION_AREA))

    @torch.no_grad()
    def _encode_edit(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, guidance: bool,
                     images: Tensor) -> Conditioning:
        prompts = list(prompts)
        negatives = self._negatives(prompts, negative_prompts, guidance, NEGATIVE_PROMPT)
        pictures = to_pil_images(images)
        ratio = pictures[0].width / pictures[0].height
        cond_width, cond_height = calculate_dimensions(self.condition_area, ratio)  # the Plus module's: (w, h)
        width, height = calculate_dimensions(self.source_area, ratio)
        seen = [self.pipe.image_processor.resize(picture, cond_height, cond_width) for picture in pictures]
        rows = [self.pipe.encode_prompt(prompt=[text], image=picture, device=self.device, num_images_per_prompt=1,
                                        max_sequence_length=self.max_sequence_length)
                for text, picture in zip(prompts + negatives, seen + seen[: len(negatives)])]
        length = max(embeds.shape[1] for embeds, _ in rows)
        embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e, _ in rows])
        mask = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        for row, (e, _) in enumerate(rows):
            mask[row, : e.shape[1]] = 1
        pixels = self.pipe.image_processor.preprocess(pictures, height, width)  # (B, 3, H, W) in [-1, 1]
        return self._edit_conditioning(prompts, embeds, mask, pixels, guidance)
