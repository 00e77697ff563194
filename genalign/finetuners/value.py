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
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from genalign.core.config import ConfigError, check
from genalign.core.normalize import PerPromptStatTracker
from genalign.core.sampler import sample
from genalign.core.types import Conditioning, Trajectory
from genalign.finetuners.common import BackboneMethod


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


def check_value_settings(prefix: str, warmup: int, updates: int, batch: int, lr: float, replay_size: int,
                         width: int) -> None:
    """Range checks of a method's value-model settings (``prefix``: critic / value, as its keys are named)."""
    check(warmup >= 0 and updates >= 1 and batch >= 1,
          f"{prefix}_warmup must be >= 0, {prefix}_updates and {prefix}_batch >= 1")
    check(lr > 0 and replay_size >= 0 and width >= 8, f"{prefix}_lr must be > 0, replay_size >= 0, {prefix}_width >= 8")


def shape_rewards(rewards: Tensor, prompts: list[str], mode: str, running: RunningStandardiser) -> Tensor:
    """Normalised learning signal of raw rewards (B,): ``running`` (running mean/std, updated with
    these rewards first), ``batch`` (this batch's mean/std), ``prompt`` (each prompt's group in the
    batch, GRPO-style) or ``none`` (raw)."""
    if mode == "none":
        return rewards.float()
    if mode == "running":
        running.update(rewards)
        return running(rewards)
    if mode == "batch":
        return (rewards.float() - rewards.float().mean()) / (rewards.float().std(unbiased=False) + 1e-6)
    return PerPromptStatTracker(buffer_size=0, min_count=2).update(prompts, rewards.float())


def average_gradients_across_processes(module: nn.Module) -> None:
    """Data-parallel value model: average its gradients over processes (each collects its own shard)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= dist.get_world_size()


class ValueLearner:
    """A :class:`ValueModel` for a backbone with what trains it: its own Adam optimiser (outside the
    trainer's), running reward statistics and a replay buffer of recent examples (dicts of tensors
    with ``target`` and ``text``). What AC-Flow's critic and VARD's value model share; the whole
    state is saved in checkpoints through the fine-tuner's ``state_dict``."""

    def __init__(self, backbone: Any, width: int, lr: float, replay_size: int, batch: int, updates: int):
        text_dim = prompt_features(backbone.encode_prompts([""], guidance=False)).shape[1]
        self.model = ValueModel(backbone.latent_shape()[0], text_dim, width).to(backbone.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.running = RunningStandardiser()
        self.replay: dict[str, Tensor] = {}
        self.replay_size, self.batch, self.updates = replay_size, batch, updates
        self.num_train_timesteps: int = backbone.schedule.num_train_timesteps
        self.device = backbone.device

    def __call__(self, x: Tensor, timesteps: Tensor, text: Tensor) -> Tensor:
        """V(x, t, prompt) (B,) in fp32 whatever the autocast; ``timesteps`` are model timesteps."""
        t = (timesteps.float().clamp(min=0) / self.num_train_timesteps).to(self.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.model(x.float(), t, text.float())

    def remember(self, examples: dict[str, Tensor]) -> None:
        """Append examples (first dims equal); the oldest fall out beyond ``replay_size`` (0: keep only these)."""
        new = {k: v.detach().float() for k, v in examples.items()}
        if not self.replay or self.replay_size == 0:
            self.replay = new
        else:
            self.replay = {k: torch.cat([self.replay[k], v])[-self.replay_size :] for k, v in new.items()}

    def train(self, inputs: Callable[[dict[str, Tensor], torch.Generator], tuple[Tensor, Tensor]],
              generator: torch.Generator) -> float:
        """``updates`` Adam steps on replay minibatches; ``inputs(minibatch, generator)`` gives the
        model's (x, timesteps) for them. Returns the mean loss."""
        losses = []
        size = self.replay["target"].shape[0]
        with torch.enable_grad():
            for _ in range(self.updates):
                index = torch.randperm(size, generator=generator)[: self.batch].to(self.replay["target"].device)
                minibatch = {k: v[index] for k, v in self.replay.items()}
                x, timesteps = inputs(minibatch, generator)
                loss = value_loss(self(x, timesteps, minibatch["text"]), minibatch["target"])
                self.optimizer.zero_grad()
                loss.backward()
                average_gradients_across_processes(self.model)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copied: later training does not change it)."""
        import copy

        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "running": self.running.state_dict(),
                              "replay": {k: v.cpu() for k, v in self.replay.items()}})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.running.load_state_dict(state["running"])
        self.replay = {k: v.to(self.device) for k, v in state["replay"].items()}


class ValueMethod(BackboneMethod):
    """What the value-based methods (AC-Flow's critic, VARD's value model) share: the checks and
    set-up of a method that trains the backbone next to a :class:`ValueLearner`, the warm-up count in
    optimizer steps, scored rollouts, and the checkpoint state."""

    name: ClassVar[str]
    learner: ValueLearner

    def _setup(self, config: Any, backbone: Any, reward: Any, sample_config: Any, *, needs_reference: bool,
               width: int, lr: float, replay_size: int, batch: int, updates: int, warmup: int) -> None:
        self.config, self.backbone, self.reward, self.sample_config = config, backbone, reward, sample_config
        self.params = backbone.named_trainable_parameters()
        if not self.params:
            raise ConfigError(f"{self.name} trains the backbone: set backbone.finetune to lora or full")
        if reward is None:
            raise ConfigError(f"{self.name} needs a reward (differentiable or not); configure reward.name")
        if needs_reference and getattr(backbone.config, "finetune", "lora") == "full":
            backbone.keep_reference()
        self.learner = ValueLearner(backbone, width, lr, replay_size, batch, updates)
        self.warmup = warmup
        self.optimizer_steps = 0

    @classmethod
    def build(cls, experiment: Any, backbone: Any, reward: Any) -> Any:
        if backbone is None:
            raise ConfigError(f"{cls.name} needs a backbone: set backbone.family and backbone.path")
        return cls(experiment.method, backbone, reward, experiment.sample)  # type: ignore[call-arg]

    @property
    def warming_up(self) -> bool:
        """During the first ``warmup`` optimizer steps only the value model learns."""
        return self.optimizer_steps < self.warmup

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1

    @torch.no_grad()
    def scored_rollout(self, prompts: list[str], samples_per_prompt: int, shaping: str,
                       generator: torch.Generator) -> tuple[Trajectory, Tensor, Tensor, Tensor]:
        """``samples_per_prompt`` samples a prompt (consecutive) with the experiment's sampler: the
        trajectory, raw rewards, shaped rewards and prompt features (B, D)."""
        s = self.sample_config
        repeated = [p for p in prompts for _ in range(samples_per_prompt)]
        cond = self.backbone.encode_prompts(repeated, guidance=s.guidance_scale != 1.0)
        trajectory = sample(self.backbone, cond, s.num_steps, s.guidance_scale, s.eta, generator=generator)
        images = self.backbone.decode(trajectory.final).float().clamp(0, 1)
        rewards = self.reward(images, repeated)[0].float()
        shaped = shape_rewards(rewards, repeated, shaping, self.learner.running).to(self.backbone.device)
        return trajectory, rewards, shaped, prompt_features(cond).to(self.backbone.device)

    def state_dict(self) -> dict[str, Any]:
        return {"learner": self.learner.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer_steps = int(state["optimizer_steps"])
