"""Backbone adapters, one file per model family, all fitting ``genalign.core.types.Backbone``.

A family registers its class with ``@register("name")`` in its own file; the registry finds it
without a list here and imports it when a config names it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from genalign.core.experiment import BackboneConfig
from genalign.core.registry import Registry
from genalign.pipelines.base import DiffusersBackbone, WeightsNotFoundError

BACKBONES: Registry[DiffusersBackbone] = Registry("backbone.family", decorator="genalign.pipelines.register", packages=["genalign.pipelines"])


def register(name: str) -> Callable[[type[DiffusersBackbone]], type[DiffusersBackbone]]:
    """Class decorator: make a backbone class (a ``from_pretrained(config, device)``) ``backbone.family: <name>``."""
    return BACKBONES.register(name)


def load_backbone(config: BackboneConfig, device: str | torch.device = "cpu", lora: str | None = None) -> DiffusersBackbone:
    """Load the backbone a config names (hub id or local folder, chosen dtype, LoRA/full/none), with
    the LoRA weights ``lora`` (a diffusers-format file or folder, e.g. a run's ``final/``) merged in."""
    backbone = BACKBONES.get(config.family).from_pretrained(config, device)
    if lora:
        backbone.load_lora(lora)
    return backbone


def family_of_pipeline(class_name: str) -> str | None:
    """The family whose backbone claims a diffusers pipeline class (``model_index.json``'s
    ``_class_name``), or None; imports every backbone module."""
    for name, cls in BACKBONES.all().items():
        if cls.detected_from_pipeline and cls.pipeline_class.__name__ == class_name:
            return name
    return None


__all__ = ["BACKBONES", "DiffusersBackbone", "WeightsNotFoundError", "family_of_pipeline", "load_backbone", "register"]
