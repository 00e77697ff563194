"""Trivial fine-tuners that exercise the trainer (test-only; the product registers real methods)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from genalign.core.config import check, field
from genalign.core.types import FineTuner
from genalign.finetuners import register


@register("toy_regression")
class ToyRegression(FineTuner):
    """Fit y = x @ W to a fixed W_true; the loss can be made NaN at a chosen step for fault tests."""

    @dataclass
    class Config:
        dim: int = field(4, help="feature size")
        nan_at_call: int = field(-1, help="make the loss NaN at this loss() call (-1: never)")
        crash_at_call: int = field(-1, help="raise KeyboardInterrupt at this loss() call (-1: never)")

        def __post_init__(self) -> None:
            check(self.dim >= 1, f"dim must be >= 1, got {self.dim}")

    def __init__(self, config: Config):
        self.config = config
        torch.manual_seed(0)
        self.model = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = nn.Dropout(0.1)  # consumes the global RNG: exact resume must restore it
        self.target = torch.arange(config.dim**2, dtype=torch.float32).view(config.dim, config.dim) / config.dim**2
        self.calls = 0

    @classmethod
    def build(cls, experiment, backbone, rewards):
        return cls(experiment.method)

    def named_trainable_parameters(self):
        return dict(self.model.named_parameters())

    def collect(self, prompts, generator):
        x = torch.randn(len(prompts), self.config.dim, generator=generator)
        return x, x @ self.target

    def loss(self, batch):
        x, y = batch
        self.calls += 1
        # Draws from Python's and numpy's global Gaussians too (odd counts leave their caches full),
        # so an exact resume must restore those states with their caches.
        draws = 1 + self.calls % 2  # 2, 1, 2, 1, ...: after 3 steps of 2 micro-steps, 9 draws
        jitter = 1.0 + 0.01 * sum(random.gauss(0.0, 1.0) for _ in range(draws))
        jitter += 0.01 * float(np.random.randn(draws).sum())
        loss = jitter * ((self.model(self.dropout(x)) - y) ** 2).mean()
        if self.calls == self.config.crash_at_call:
            raise KeyboardInterrupt("simulated kill")
        if self.calls == self.config.nan_at_call:
            loss = loss * float("nan")
        return loss, {"reward": -loss.detach()}

    def sample(self, prompts, generator):
        w = torch.sigmoid(self.model.weight.detach())
        return w.expand(len(prompts), 3, -1, -1)

    def export(self, directory):
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.model.weight.detach().contiguous()}, str(directory / "model.safetensors"))


@register("toy_denoising")
class ToyDenoising(FineTuner):
    """The plain denoising objective on random latents, through a real backbone with LoRA."""

    @dataclass
    class Config:
        num_steps: int = field(4, help="sampling steps of the sample grid")

    def __init__(self, config: Config, backbone):
        self.config = config
        self.backbone = backbone

    @classmethod
    def build(cls, experiment, backbone, rewards):
        return cls(experiment.method, backbone)

    def named_trainable_parameters(self):
        return self.backbone.named_trainable_parameters()

    def collect(self, prompts, generator):
        bb = self.backbone
        cond = bb.encode_prompts(prompts, guidance=False)
        x0 = torch.randn(len(prompts), *bb.latent_shape(), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = bb.schedule.sample_training_timesteps(len(prompts), generator)
        return cond, x0.to(bb.device), noise.to(bb.device), t

    def loss(self, batch):
        cond, x0, noise, t = batch
        bb = self.backbone
        pred = bb.predict(bb.schedule.add_noise(x0, noise, t), t, cond)
        loss = ((pred.float() - bb.schedule.training_target(x0, noise, t).float()) ** 2).mean()
        return loss, {"mse": loss.detach()}

    def sample(self, prompts, generator):
        from genalign.core.sampler import sample

        bb = self.backbone
        cond = bb.encode_prompts(prompts, guidance=False)
        return bb.decode(sample(bb, cond, self.config.num_steps, generator=generator).final)

    def export(self, directory):
        self.backbone.save_lora(directory)


@register("toy_prompt_regression")
class ToyPromptRegression(ToyRegression):
    """Data is a pure function of the prompt ("p<i>" -> row i of a fixed table), so the union of
    the ranks' shards is the single-process batch (for the data-parallel equivalence test)."""

    def __init__(self, config):
        super().__init__(config)
        self.dropout = nn.Identity()
        self.table = torch.randn(64, config.dim, generator=torch.Generator().manual_seed(1))

    def collect(self, prompts, generator):
        x = self.table[[int(p[1:]) for p in prompts]]
        return x, x @ self.target

    def loss(self, batch):
        x, y = batch
        loss = ((self.model(x) - y) ** 2).mean()  # no random jitter: the ranks must agree exactly
        return loss, {"reward": -loss.detach()}
