"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): CLIP-H/14 fine-tuned on Pick-a-Pic preferences;
score = ``logit_scale.exp() * cos(image, text)`` (the official model card's inference code).

The weights' repo (``yuvalkirstain/PickScore_v1``) has no processor files: tokenizer and image
settings come from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``options.processor``), as in the
official code.
"""

from __future__ import annotations

from genalign.rewards import register
from genalign.rewards.clip import CLIPScore


@register("pickscore")
class PickScore(CLIPScore):
    summary = "PickScore v1 human preference score (CLIP-H)"
    name = "pickscore"
    default_path = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
