"""Temporal rewards: scores of whole videos (B, F, 3, H, W) in [0, 1], differentiable.

- ``flicker``: temporal steadiness as VBench's *temporal flickering* measures it (Huang et al. 2024):
  ``1 - mean_t mean_pixels |x_{t+1} - x_t|`` on [0, 1] pixels (VBench: ``(255 - MAE) / 255`` on 8-bit
  frames). 1 for a still video; no model.
- ``motion``: the opposite, ``mean_t mean_pixels |x_{t+1} - x_t|``: how much the video moves, a
  model-free stand-in for VBench's *dynamic degree* (which needs RAFT optical flow), to weigh against
  rewards that a frozen video maximises.
- ``frame_consistency``: VBench's *background consistency* (CLIP image features; its *subject
  consistency* is the same formula on DINO features):
  ``1 / (F - 1) sum_{t >= 2} (cos(e_1, e_t) + cos(e_{t-1}, e_t)) / 2`` over unit image embeddings,
  with the CLIP of ``path`` (default ``openai/clip-vit-base-patch32``, VBench's ViT-B/32) and the
  ``clip`` reward's differentiable preprocessing.

Image rewards score videos frame by frame (``reward.frames``, ``reward.frame_reduce``:
``rewards/base.py``); a weighted sum mixes both kinds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from genalign.core.experiment import RewardConfig
from genalign.rewards import register
from genalign.rewards.base import DTYPES, Metadata, RewardInputError, RewardModel, check_options


def frame_differences(video: Tensor) -> Tensor:
    """(B,) mean absolute change between consecutive frames of videos (B, F, 3, H, W)."""
    if video.shape[1] < 2:
        raise RewardInputError(f"temporal rewards need at least 2 frames; got {video.shape[1]}")
    return (video[:, 1:] - video[:, :-1]).abs().flatten(1).mean(dim=1)


def consistency(embeddings: Tensor) -> Tensor:
    """(B,) VBench's consistency of per-frame embeddings (B, F, D): the mean over frames t >= 2 of
    the average cosine of frame t with the first frame and with the previous one."""
    if embeddings.shape[1] < 2:
        raise RewardInputError(f"temporal rewards need at least 2 frames; got {embeddings.shape[1]}")
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    with_first = (unit[:, 1:] * unit[:, :1]).sum(-1)
    with_previous = (unit[:, 1:] * unit[:, :-1]).sum(-1)
    return ((with_first + with_previous) / 2).mean(dim=1)


@register("motion")
class Motion(RewardModel):
    summary = "mean |frame change| (how much a video moves; no model)"
    name = "motion"
    differentiable = True
    takes_video = True

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> Motion:
        check_options(config.name, config.options, ())
        return cls(device)

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        return frame_differences(images.float())


@register("flicker")
class Flicker(Motion):
    summary = "1 - mean |frame change| (VBench temporal flickering; no model)"
    name = "flicker"

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        return 1 - super().score(images, prompts, metadata)


@register("frame_consistency")
class FrameConsistency(RewardModel):
    summary = "VBench consistency of CLIP frame embeddings (with the first and the previous frame)"
    name = "frame_consistency"
    differentiable = True
    takes_video = True
    default_path = "openai/clip-vit-base-patch32"

    def __init__(self, encoder: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(device, dtype)
        self.encoder = encoder

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> FrameConsistency:
        from genalign.rewards.clip import load_encoder

        check_options(config.name, config.options, ("model", "processor"))
        device = torch.device(device)
        return cls(load_encoder(config, device, cls.default_path), device, DTYPES[config.dtype])

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        batch, frames = images.shape[:2]
        embeddings = self.encoder.image_embeds(images.flatten(0, 1)).float()
        return consistency(embeddings.view(batch, frames, -1))
