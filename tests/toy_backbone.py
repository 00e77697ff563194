"""A backbone family in one file (test-only): Stable Diffusion under another name, registered on
import. Adding a family needs this file and nothing else (no list, no CLI choice to edit)."""

from __future__ import annotations

from genalign.pipelines import register
from genalign.pipelines.sd import StableDiffusionBackbone


@register("toy-sd")
class ToyStableDiffusion(StableDiffusionBackbone):
    summary = "Stable Diffusion under a test name (a family added in one file)"
    detected_from_pipeline = False  # a StableDiffusionPipeline folder stays "sd" for --family auto

    @classmethod
    def tiny_layouts(cls):  # `genalign tiny toy-sd`: the tiny SD layout with another seed
        from genalign.pipelines.tiny import tiny_sd_pipeline

        return {"toy-sd": lambda prediction_type, seed: tiny_sd_pipeline(prediction_type, False, seed + 1)}
