"""JPEG (in)compressibility, the DDPO tasks (Black et al. 2023): the size in kB of the image saved
as JPEG at quality 95; ``jpeg_compressibility`` = -size (smaller files are better),
``jpeg_incompressibility`` = +size. Not differentiable (PIL's encoder); the prompt is ignored.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

from genalign.core.experiment import RewardConfig
from genalign.core.images import to_pil_images
from genalign.rewards import register
from genalign.rewards.base import Metadata, RewardModel, check_options


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """(B,) JPEG sizes in kB (1000 bytes) of images (B, 3, H, W) in [0, 1], rounded to uint8 first."""
    sizes = []
    for image in to_pil_images(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register("jpeg_compressibility")
class JpegCompressibility(RewardModel):
    summary = "minus the JPEG size of the image (DDPO's compressibility task)"
    name = "jpeg_compressibility"
    differentiable = False
    sign = -1.0

    def __init__(self, quality: int = 95, device: str | torch.device = "cpu"):
        super().__init__(device)
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = quality

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> JpegCompressibility:
        check_options(config.name, config.options, ("quality",))
        return cls(int(config.options.get("quality", 95)), device)

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        return self.sign * jpeg_size_kb(images, self.quality).to(images.device)


@register("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    summary = "the JPEG size of the image (DDPO's incompressibility task)"
    name = "jpeg_incompressibility"
    sign = 1.0
