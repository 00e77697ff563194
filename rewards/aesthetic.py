"""LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann): the OpenAI CLIP
ViT-L/14 image embedding, L2-normalised, into a 5-layer linear MLP (no activations) trained on
SAC + LAION-Logos + AVA ratings; scores are roughly 1-10.

The MLP's published state dict is ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.{0,2,4,6,7}``;
the odd indices were dropouts). genalign ships it (as safetensors, ``genalign/data/aesthetic/``) and
uses it by default; ``options.mlp`` is another local file (``.safetensors`` or a torch file) or
``repo_id/filename`` on the hub (e.g. trl's copy ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``).
``path`` is the CLIP ViT-L/14 (default ``openai/clip-vit-large-patch14``; an open_clip one with
``options.model``). The score does not depend on the prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from genalign.core.experiment import RewardConfig
from genalign.core.loading import resolve_file
from genalign.core.reference_data import aesthetic_head
from genalign.rewards import register
from genalign.rewards.base import (
    DTYPES,
    Metadata,
    PreferenceMLP,
    RewardModel,
    cached,
    check_options,
    freeze,
    load_checkpoint,
)
from genalign.rewards.clip import load_encoder

AestheticMLP = PreferenceMLP  # 768 -> 1024 -> 128 -> 64 -> 16 -> 1, see rewards/base.py


def load_mlp(location: str) -> AestheticMLP:
    """The MLP from a local file (safetensors, or torch with weights_only) or ``repo_id/filename`` on the hub."""
    if Path(location).is_file():
        file = Path(location)
    else:
        repo, _, filename = location.rpartition("/")
        file = resolve_file(repo, filename, hint="Set reward.options.mlp to a local sac+logos+ava1-l14-linearMSE.pth")
    state = load_checkpoint(file)
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return freeze(mlp)


@register("aesthetic")
class Aesthetic(RewardModel):
    summary = "LAION aesthetic predictor v2 on CLIP ViT-L/14 image embeddings"
    name = "aesthetic"
    differentiable = True

    def __init__(self, encoder: nn.Module, mlp: AestheticMLP, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(device, dtype)
        self.encoder = encoder
        self.mlp = mlp

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> Aesthetic:
        check_options(config.name, config.options, ("mlp", "model"))
        device = torch.device(device)
        encoder = load_encoder(config, device, "openai/clip-vit-large-patch14")
        location = str(config.options.get("mlp") or aesthetic_head())
        mlp = cached(("aesthetic_mlp", location, str(device)), lambda: load_mlp(location).to(device))
        return cls(encoder, mlp, device, DTYPES[config.dtype])

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        embeds = self.encoder.image_embeds(images)  # (B, 768)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.mlp(embeds).squeeze(-1)
