"""Images as the rest of the world stores them: 8-bit RGB, rounded from the [0, 1] tensors the
Backbone and Reward contracts use (what a saved PNG holds)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def to_pil_images(images: Tensor) -> list[Any]:
    """(B, 3, H, W) in [0, 1] -> B RGB PIL images, clamped and rounded to 8 bits."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


def save_grid(images: Tensor, path: str | Path, per_row: int = 8) -> None:
    """A grid PNG of images (B, 3, H, W), ``per_row`` a row, or of videos (B, F, 3, H, W), a row of
    frames each (torchvision's layout: 2 px padding)."""
    from torchvision.utils import save_image

    images = images.detach().float().clamp(0, 1)
    if images.ndim == 5:
        save_image(images.flatten(0, 1), path, nrow=images.shape[1])
    else:
        save_image(images, path, nrow=min(per_row, len(images)))


def load_image(path: str | Path) -> Tensor:
    """(3, H, W) float in [0, 1] from an image file (converted to RGB)."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB")).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def check_images(images: Any, count: int, what: str = "source images") -> Tensor:
    """``count`` images (count, 3, H, W) float in [0, 1], or a clear error."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a float tensor (B, 3, H, W) in [0, 1]; got {shape}")
    if images.shape[0] != count:
        raise ValueError(f"{images.shape[0]} {what} for {count} prompts")
    if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
        raise ValueError(f"{what} must be in [0, 1]")
    return images


def read_source_images(path: str | Path) -> dict[str, Tensor]:
    """{prompt: (3, H, W) image} from a JSONL of ``{"prompt": ..., "source_image": file}`` rows (files
    relative to the JSONL's folder), the format of instruction-editing datasets."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source_images: file not found: {path}")
    images: dict[str, Tensor] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, Mapping) or not isinstance(row.get("prompt"), str) or not row.get("source_image"):
            raise ValueError(f"{path}:{number}: rows need a 'prompt' and a 'source_image' file")
        images[row["prompt"]] = load_image(path.parent / str(row["source_image"]))
    if not images:
        raise ValueError(f"source_images: {path} has no rows")
    return images
