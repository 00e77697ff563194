"""Image preprocessing of reward models on tensors: resize, crop and normalise as the official
PIL / torchvision pipelines do, differentiably and batched (no PIL, no numpy).

Matches torchvision's ``Resize(size)`` (shortest side, long side ``int(size * long / short)``)
and ``CenterCrop`` rounding; bicubic resizing uses antialiasing when shrinking, as PIL does.
The parity with PIL on a real photo is asserted in ``tests/test_rewards_base.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# OpenAI CLIP's normalisation, used by CLIP, open_clip ViT-H/14, PickScore, HPSv2, BLIP, ...
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """(B, C, H, W) -> (B, C, *size); antialiased when shrinking like PIL."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(images, size=size, mode=mode, **kwargs)
    # bicubic overshoots at edges; PIL's uint8 output clips it to the pixel range
    return resized.clamp(0, 1) if mode == "bicubic" else resized


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(int)``: the short side becomes ``size``, the long side is truncated."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shortest(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    return resize(images, shortest_side_size(images.shape[-2], images.shape[-1], size), mode)


def resize_longest_pad(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """The longest side becomes ``size`` (rounded), then zero-pad to a centred square: HPSv2's
    eval transform (``ResizeMaxSize`` of its open_clip fork, padding ``[w//2, h//2, rest]``)."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    images = resize(images, (new_h, new_w), mode)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def center_crop(images: Tensor, size: tuple[int, int], floor: bool = False) -> Tensor:
    """torchvision's ``CenterCrop`` (pads with zeros when the image is smaller); ``floor``: offsets
    rounded down, as transformers' image processors crop."""
    crop_h, crop_w = size
    height, width = images.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = images.shape[-2:]
    if floor:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    else:
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return images[..., top : top + crop_h, left : left + crop_w]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


@dataclass(frozen=True)
class ImageTransform:
    """resize -> center crop -> normalise, all on tensors.

    ``resize_to``: an int resizes the shortest side (CLIP) or, with ``longest_pad``, the longest
    side and pads to a square (HPSv2); a pair resizes to exactly (H, W) (BLIP). ``crop``: the
    center crop (H, W) or None, its offset rounded as torchvision / open_clip do (the references of
    open_clip models, HPS, ImageReward) or, with ``floor_crop``, floored as transformers' image
    processors do (transformers CLIP, PickScore).
    """

    resize_to: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    mode: str = "bicubic"
    longest_pad: bool = False
    floor_crop: bool = False

    def __call__(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1], float -> normalised model input (fp32)."""
        images = images.float()
        if isinstance(self.resize_to, int):
            resize_one = resize_longest_pad if self.longest_pad else resize_shortest
            images = resize_one(images, self.resize_to, self.mode)
        elif self.resize_to is not None:
            images = resize(images, tuple(self.resize_to), self.mode)
        if self.crop is not None:
            images = center_crop(images, self.crop, floor=self.floor_crop)
        return normalize(images, self.mean, self.std)


def clip_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> ImageTransform:
    """CLIP's eval preprocessing: bicubic resize of the shortest side to ``size``, center crop."""
    return ImageTransform(size, (size, size), tuple(mean), tuple(std))
