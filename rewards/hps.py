"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): open_clip ViT-H-14 whose weights
are replaced by the HPS checkpoint (``xswu/HPSv2``: ``HPS_v2_compressed.pt`` or
``HPS_v2.1_compressed.pt``, a dict with ``state_dict``); score = cos(image, text) of the
normalised embeddings (the official ``img_score.py``: diagonal of ``image_features @
text_features.T``), no logit scale.

Preprocessing is HPSv2's eval transform: bicubic resize of the longest side to 224, zero-pad to
a centred square, OpenAI CLIP normalisation (for square generations: a plain resize).

Config: ``{name: hps}`` (HPSv2.1), ``options: {version: v2}`` for HPSv2, ``path``: the hub repo or
a local checkpoint file; ``options.model``: the open_clip architecture (default ViT-H-14). The
sub-score, in training logs and reports, is named with the version (``hps_v2.1``, ``hps_v2``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from genalign.core.experiment import RewardConfig
from genalign.core.loading import resolve_file
from genalign.rewards import register
from genalign.rewards.base import DTYPES, cached, check_options, load_checkpoint
from genalign.rewards.clip import CLIPScore, OpenCLIP

CHECKPOINTS = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@register("hps")
class HPSv2(CLIPScore):
    summary = "HPSv2 / HPSv2.1 human preference score (open_clip ViT-H-14)"
    name = "hps"
    default_path = "xswu/HPSv2"
    use_logit_scale = False

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> HPSv2:
        check_options(config.name, config.options, ("model", "version"))
        version = str(config.options.get("version", "v2.1"))
        if version not in CHECKPOINTS:
            raise ValueError(f"reward {config.name}: options.version must be one of {sorted(CHECKPOINTS)}, got {version!r}")
        model_name = config.options.get("model", "ViT-H-14")
        file = resolve_file(config.path or cls.default_path, CHECKPOINTS[version],
                            hint="Download the HPS checkpoint or set reward.path to it")
        device, dtype = torch.device(device), DTYPES[config.dtype]

        def build() -> OpenCLIP:
            encoder = OpenCLIP(model_name, None, device, dtype, config.gradient_checkpointing)
            encoder.load_weights(load_checkpoint(file))
            encoder.transform = replace(encoder.transform, crop=None, longest_pad=True)
            return encoder

        encoder = cached(("hps", model_name, str(file), str(device), dtype, config.gradient_checkpointing), build)
        reward = cls(encoder, device, dtype)
        reward.version = version
        return reward

    version = "v2.1"

    @property
    def label(self) -> str:
        """``hps_v2`` or ``hps_v2.1``: the two versions score on different scales, so every log and
        report says which one it is."""
        return f"hps_{self.version}"
