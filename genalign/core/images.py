"""Images as the rest of the world stores them: 8-bit RGB, rounded from the [0, 1] tensors the
Backbone and Reward contracts use (what a saved PNG holds)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def to_pil_images(images: Tensor) -> list[Any]:
    """(B, 3, H, W) in [0, 1] -> B RGB PIL images, clamped and rounded to 8 bits."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]
