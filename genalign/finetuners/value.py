"""A light value model V(x_t, t, prompt) -> expected final reward, shared by the value-based methods
(AC-Flow's critic, VARD's value model), and the pieces that train it.

Architecture: a small CNN over the latents (two stride-2 convolutions and an adaptive pool, so any
latent size works) and an MLP with LayerNorm over [CNN features, sinusoidal embedding of the
normalised timestep, projected prompt features]. Prompt features come from the backbone's opaque
conditioning without knowing the family: its pooled embedding where it has one (SDXL, SD3, FLUX),
else the mean of the token embeddings (SD 1.x/2.x).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from genalign.core.types import Conditioning


def prompt_features(cond: Conditioning) -> Tensor:
    """(B, D) features of the prompts: ``pooled`` if the conditioning has it, else the token mean."""
    if "pooled" in cond.positive:
        return cond.positive["pooled"].float()
    embeds = cond.positive["prompt_embeds"].float()
    return embeds.mean(dim=1) if embeds.ndim == 3 else embeds


def timestep_embedding(t: Tensor, dim: int = 64) -> Tensor:
    """Sinusoidal embedding (B, dim) of ``t`` in [0, 1] (frequencies 1 .. 1000, as diffusion models)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ValueModel(nn.Module):
    """V(x_t, t, prompt features) -> (B,) predicted final (shaped) reward."""

    def __init__(self, latent_channels: int, text_dim: int, width: int = 128, conv_width: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        c = conv_width
        self.cnn = nn.Sequential(
            nn.Conv2d(latent_channels, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(dropout),
        )
        self.text = nn.Linear(text_dim, width)
        self.mlp = nn.Sequential(
            nn.Linear(2 * c * 16 + 64 + width, width), nn.LayerNorm(width), nn.SiLU(),
            nn.Linear(width, width), nn.LayerNorm(width), nn.SiLU(),
            nn.Linear(width, 1),
        )

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        """x (B, C, h, w) latents, t (B,) in [0, 1] (1 = noise), text (B, D) -> (B,)."""
        features = torch.cat([self.cnn(x.float()), timestep_embedding(t), self.text(text.float())], dim=1)
        return self.mlp(features).squeeze(1)


def value_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of the value predictions (B,) against Monte-Carlo returns (B,)."""
    return (predicted.float() - target.detach().float()).pow(2).mean()


class RunningStandardiser:
    """Standardise rewards with running statistics (exponential moving mean and variance over batches,
    bias-corrected): targets stay on a stable scale while the policy improves."""

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    def update(self, rewards: Tensor) -> None:
        m = self.momentum
        self.mean = m * self.mean + (1 - m) * float(rewards.float().mean())
        self.var = m * self.var + (1 - m) * float(rewards.float().var(unbiased=False)) if rewards.numel() > 1 else self.var
        self.count += 1

    def __call__(self, rewards: Tensor) -> Tensor:
        if self.count == 0:
            raise RuntimeError("update() the standardiser before using it")
        correction = 1 - self.momentum**self.count
        mean, var = self.mean / correction, self.var / correction
        return (rewards.float() - mean) / math.sqrt(var + 1e-6)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": float(self.count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
