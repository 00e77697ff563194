"""Backbone adapters, one per model family, all fitting ``genalign.core.types.Backbone``."""

from __future__ import annotations

import torch

from genalign.core.experiment import BackboneConfig
from genalign.pipelines.base import DiffusersBackbone, WeightsNotFoundError
from genalign.pipelines.flux import FluxBackbone
from genalign.pipelines.sd import StableDiffusionBackbone, StableDiffusionTurboBackbone
from genalign.pipelines.sd3 import StableDiffusion3Backbone
from genalign.pipelines.sdxl import StableDiffusionXLBackbone, StableDiffusionXLTurboBackbone

BACKBONES: dict[str, type[DiffusersBackbone]] = {
    "sd": StableDiffusionBackbone,
    "sd-turbo": StableDiffusionTurboBackbone,
    "sdxl": StableDiffusionXLBackbone,
    "sdxl-turbo": StableDiffusionXLTurboBackbone,
    "sd3": StableDiffusion3Backbone,
    "flux": FluxBackbone,  # FLUX.1 [dev] and [schnell] (one-step/few-step) alike
}


def load_backbone(config: BackboneConfig, device: str | torch.device = "cpu") -> DiffusersBackbone:
    """Load the backbone a config names (hub id or local folder, chosen dtype, LoRA/full/none)."""
    if config.family not in BACKBONES:
        raise ValueError(f"unknown backbone.family {config.family!r}; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[config.family].from_pretrained(config, device)


__all__ = ["BACKBONES", "DiffusersBackbone", "WeightsNotFoundError", "load_backbone"]
