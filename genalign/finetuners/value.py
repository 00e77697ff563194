"""A light value model V(x_t, t, prompt) -> expected final reward, shared by the value-based methods
(AC-Flow's critic, VARD's value model), and the pieces that train it.

Two kinds of inputs, each with its head:

- ``encoder`` (:class:`CleanEstimateFeatures` + :class:`EmbeddingValueHead`, the default): a frozen
  image-text encoder (CLIP) on the decoded one-step clean estimate of the frozen reference at the
  state, and an MLP with LayerNorm over [image, prompt, product, cosine, t]. It generalises from a
  few hundred trajectories (bench/value_model.py).
- ``latent`` (:class:`LatentFeatures` + :class:`ValueModel`): a small CNN over the latents (two
  stride-2 convolutions and an adaptive pool, so any latent size works) and an MLP with LayerNorm
  over [CNN features, sinusoidal embedding of the normalised timestep, projected prompt features].
  Prompt features come from the backbone's opaque conditioning without knowing the family: its
  pooled embedding where it has one (SDXL, SD3, FLUX), else the mean of the token embeddings.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from genalign.core.config import ConfigError, check
from genalign.core.distributed import average_gradients, clip_gradients, gather_batch
from genalign.core.normalize import PerPromptStatTracker
from genalign.core.rollout import rollout
from genalign.core.types import Conditioning, Trajectory
from genalign.finetuners.common import BackboneMethod


def prompt_features(cond: Conditioning) -> Tensor:
    """(B, D) features of the prompts: ``pooled`` if the conditioning has it, else the token mean
    (over the tokens its ``mask`` keeps, where prompts are padded to one length: Qwen-Image)."""
    if "pooled" in cond.positive:
        return cond.positive["pooled"].float()
    embeds = cond.positive["prompt_embeds"].float()
    if embeds.ndim != 3:
        return embeds
    mask = cond.positive.get("mask")
    if mask is None:
        return embeds.mean(dim=1)
    weights = mask.to(embeds.device, embeds.dtype).unsqueeze(-1)
    return (embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def timestep_embedding(t: Tensor, dim: int = 64) -> Tensor:
    """Sinusoidal embedding (B, dim) of ``t`` in [0, 1] (frequencies 1 .. 1000, as diffusion models)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ValueModel(nn.Module):
    """V(x_t, t, prompt features) -> (B,) predicted final (shaped) reward: the light head on latents."""

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


class EmbeddingValueHead(nn.Module):
    """V from a frozen image-text encoder's embeddings: an MLP with LayerNorm over [unit image
    embedding, unit text embedding, their elementwise product, their cosine (x 10), sinusoidal t]."""

    def __init__(self, embed_dim: int, width: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(3 * embed_dim + 1 + 64, width), nn.LayerNorm(width), nn.SiLU(),
            nn.Linear(width, width), nn.LayerNorm(width), nn.SiLU(),
            nn.Linear(width, 1),
        )

    def forward(self, image: Tensor, text: Tensor, t: Tensor) -> Tensor:
        """image, text (B, D) embeddings, t (B,) in [0, 1] -> (B,)."""
        i = image.float() / image.float().norm(dim=-1, keepdim=True)
        p = text.float() / text.float().norm(dim=-1, keepdim=True)
        features = torch.cat([i, p, i * p, 10 * (i * p).sum(-1, keepdim=True), timestep_embedding(t)], dim=1)
        return self.mlp(features).squeeze(1)


def normalised_time(timesteps: Tensor, num_train_timesteps: int, like: Tensor) -> Tensor:
    """(B,) model timesteps as t in [0, 1] (1 = noise; the end of the chain, negative, is 0)."""
    t = torch.as_tensor(timesteps).float().clamp(min=0) / num_train_timesteps
    return t.to(like.device).expand(like.shape[0])


class LatentFeatures:
    """Value inputs ``latent``: the state itself, its normalised time and the prompt features of its
    conditioning, for :class:`ValueModel`; a video's latent frames are stacked as channels. Cheap,
    but it has no prior: at the data sizes of a short run it memorises trajectories (docs/results.md)."""

    def __init__(self, backbone: Any):
        self.num_train_timesteps: int = backbone.schedule.num_train_timesteps
        self.channels = math.prod(backbone.latent_shape()[:-2])  # (C, [f,] h, w): C f channels for video
        self.text_dim = prompt_features(backbone.encode_prompts([""], guidance=False)).shape[1]

    def head(self, width: int) -> nn.Module:
        return ValueModel(self.channels, self.text_dim, width)

    def __call__(self, x: Tensor, timesteps: Tensor, cond: Conditioning) -> dict[str, Tensor]:
        t = normalised_time(timesteps, self.num_train_timesteps, x)
        return {"x": x.float().flatten(1, -3), "t": t, "text": prompt_features(cond).to(x.device)}


class CleanEstimateFeatures:
    """Value inputs ``encoder``: a frozen image-text encoder (CLIP) on the decoded one-step clean
    estimate of the frozen reference model at the state (guided as the sampler is), and on the
    prompt, for :class:`EmbeddingValueHead` (a video: the mean of its frames' embeddings). The features are a fixed function of the state (the
    reference and the encoder never train), so replayed features stay valid, and gradients reach
    the state through the reference, the VAE decoder and the encoder; its prior is what lets it
    generalise from a few hundred trajectories (docs/results.md). The final state (t = 0) is its
    own clean estimate."""

    def __init__(self, backbone: Any, encoder: Any, guidance_scale: float):
        self.backbone, self.encoder, self.guidance_scale = backbone, encoder, guidance_scale
        self.num_train_timesteps: int = backbone.schedule.num_train_timesteps
        self.embed_dim = int(encoder.text_embeds([""]).shape[1])
        self._text: dict[str, Tensor] = {}

    def head(self, width: int) -> nn.Module:
        return EmbeddingValueHead(self.embed_dim, width)

    def text_embeds(self, prompts: list[str]) -> Tensor:
        missing = sorted({p for p in prompts if p not in self._text})
        if missing:
            with torch.no_grad():
                for prompt, embed in zip(missing, self.encoder.text_embeds(missing).float()):
                    self._text[prompt] = embed
        return torch.stack([self._text[p] for p in prompts])

    def __call__(self, x: Tensor, timesteps: Tensor, cond: Conditioning) -> dict[str, Tensor]:
        if not cond.prompts:
            raise ValueError("value inputs 'encoder' need the prompts of the conditioning")
        b = self.backbone
        timesteps = torch.as_tensor(timesteps).to(x.device).expand(x.shape[0])
        t = normalised_time(timesteps, self.num_train_timesteps, x)
        final = t <= 0
        clean = x.float()
        if not bool(final.all()):
            with b.reference():
                output = b.predict(x.to(b.dtype), timesteps.clamp(min=0), cond, self.guidance_scale)
            estimate = b.schedule.clean_estimate(x, output, timesteps.clamp(min=0))
            clean = torch.where(final.view(-1, *[1] * (x.ndim - 1)), clean, estimate.float())
        images = b.decode(clean.to(b.dtype)).float()
        if images.ndim == 5:  # a video: the mean of its frames' embeddings
            embeds = self.encoder.image_embeds(images.flatten(0, 1)).float().view(*images.shape[:2], -1).mean(dim=1)
        else:
            embeds = self.encoder.image_embeds(images).float()
        return {"image": embeds, "text": self.text_embeds(cond.prompts).to(x.device),
                "t": t}


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


class ValueLearner:
    """A value head over value inputs (:class:`LatentFeatures` or :class:`CleanEstimateFeatures`)
    with what trains it: its own Adam optimiser (outside the trainer's), running reward statistics
    and a replay buffer of recent examples (the inputs' features with a ``target``). What AC-Flow's
    critic and VARD's value model share; the whole state is saved in checkpoints through the
    fine-tuner's ``state_dict``."""

    def __init__(self, features: LatentFeatures | CleanEstimateFeatures, device: torch.device | str, width: int,
                 lr: float, replay_size: int, batch: int, updates: int, max_grad_norm: float = 1.0):
        self.features = features
        self.model = features.head(width).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.running = RunningStandardiser()
        self.replay: dict[str, Tensor] = {}
        self.replay_size, self.batch, self.updates = replay_size, batch, updates
        self.device = device
        self.max_grad_norm = max_grad_norm  # each update's gradient norm is clipped to this (0: no bound)

    def value(self, features: dict[str, Tensor]) -> Tensor:
        """V (B,) of featurised states, in fp32 whatever the autocast (a ``target`` entry is ignored)."""
        with torch.autocast(device_type=torch.device(self.device).type, enabled=False):
            return self.model(**{k: v.float() for k, v in features.items() if k != "target"})

    def __call__(self, x: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        """V(x, t, prompt) (B,); ``timesteps`` are model timesteps (scalar or (B,)). Differentiable in ``x``."""
        return self.value(self.features(x, torch.as_tensor(timesteps), cond))

    @torch.no_grad()
    def featurize(self, x: Tensor, timesteps: Tensor, cond: Conditioning, chunk: int = 64) -> dict[str, Tensor]:
        """The value inputs of many states (no gradient), ``chunk`` states at a time."""
        timesteps = torch.as_tensor(timesteps).expand(x.shape[0])
        parts = [self.features(x[i : i + chunk], timesteps[i : i + chunk], cond.select(slice(i, i + chunk)))
                 for i in range(0, x.shape[0], chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def remember(self, examples: dict[str, Tensor]) -> None:
        """Append examples (first dims equal); the oldest fall out beyond ``replay_size`` (0: keep only these)."""
        new = {k: v.detach().float() for k, v in examples.items()}
        if not self.replay or self.replay_size == 0:
            self.replay = new
        else:
            self.replay = {k: torch.cat([self.replay[k], v])[-self.replay_size :] for k, v in new.items()}

    def train(self, generator: torch.Generator) -> float:
        """``updates`` Adam steps on replay minibatches of ``batch``. Returns the mean loss."""
        losses = []
        size = self.replay["target"].shape[0]
        with torch.enable_grad():
            for _ in range(self.updates):
                index = torch.randperm(size, generator=generator)[: self.batch].to(self.replay["target"].device)
                minibatch = {k: v[index] for k, v in self.replay.items()}
                loss = value_loss(self.value(minibatch), minibatch["target"])
                self.optimizer.zero_grad()
                loss.backward()
                params = list(self.model.parameters())
                average_gradients(params)
                clip_gradients(params, self.max_grad_norm)
                self.optimizer.step()
                losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copied: later training does not change it)."""
        import copy

        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "running": self.running.state_dict()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.running.load_state_dict(state["running"])
        if "replay" in state:  # a checkpoint from before the per-process split
            self.load_replay(state["replay"])

    def replay_state(self) -> dict[str, Tensor]:
        """This process's replay buffer (each process remembers its own samples)."""
        return {k: v.detach().cpu().clone() for k, v in self.replay.items()}

    def load_replay(self, replay: dict[str, Tensor]) -> None:
        self.replay = {k: v.to(self.device) for k, v in replay.items()}


class ValueMethod(BackboneMethod):
    """What the value-based methods (AC-Flow's critic, VARD's value model) share: the checks and
    set-up of a method that trains the backbone next to a :class:`ValueLearner`, the warm-up count in
    optimizer steps, scored rollouts, and the checkpoint state."""

    name: ClassVar[str]
    encoder_key: ClassVar[str]  # the config key naming the image-text encoder of ``encoder`` value inputs
    learner: ValueLearner

    def _setup(self, config: Any, backbone: Any, reward: Any, sample_config: Any, *, needs_reference: bool,
               inputs: str, encoder: Any, width: int, lr: float, replay_size: int, batch: int, updates: int,
               warmup: int) -> None:
        self.config, self.backbone, self.reward, self.sample_config = config, backbone, reward, sample_config
        self.params = backbone.named_trainable_parameters()
        if not self.params:
            raise ConfigError(f"{self.name} trains the backbone: set backbone.finetune to lora or full")
        if reward is None:
            raise ConfigError(f"{self.name} needs a reward (differentiable or not); configure reward.name")
        features: LatentFeatures | CleanEstimateFeatures
        if inputs == "encoder":
            if encoder is None:
                raise ConfigError(f"{self.name}: {self.encoder_key.split('_')[0]}_inputs: encoder needs an image-text "
                                  f"encoder: set method.{self.encoder_key} to a CLIP model (hub id or folder)")
            features = CleanEstimateFeatures(backbone, encoder, sample_config.guidance_scale)
        else:
            features = LatentFeatures(backbone)
        if needs_reference or inputs == "encoder":
            backbone.keep_reference()
        self.learner = ValueLearner(features, backbone.device, width, lr, replay_size, batch, updates)
        self.warmup = warmup
        self.optimizer_steps = 0

    @classmethod
    def build(cls, experiment: Any, backbone: Any, reward: Any, encoder: Any = None) -> Any:
        """``encoder``: the image-text encoder ``method.<encoder_key>`` names, loaded by the caller
        (fine-tuners import only core)."""
        if backbone is None:
            raise ConfigError(f"{cls.name} needs a backbone: set backbone.family and backbone.path")
        return cls(experiment.method, backbone, reward, experiment.sample, encoder=encoder)  # type: ignore[call-arg]

    @property
    def warming_up(self) -> bool:
        """During the first ``warmup`` optimizer steps only the value model learns."""
        return self.optimizer_steps < self.warmup

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1

    @torch.no_grad()
    def scored_rollout(self, prompts: list[str], samples_per_prompt: int, shaping: str,
                       generator: torch.Generator) -> tuple[Trajectory, Tensor, Tensor]:
        """``samples_per_prompt`` samples a prompt (consecutive) with the experiment's sampler: the
        trajectory, raw rewards and shaped rewards."""
        s = self.sample_config
        r = rollout(self.backbone, prompts, s.num_steps, s.guidance_scale, s.eta,
                    samples_per_prompt=samples_per_prompt, generator=generator, sde=s.sde)
        trajectory, repeated = r.trajectory, r.prompts
        rewards = self.reward(r.images, repeated)[0].float()
        # the statistics of the whole data-parallel batch (as one process with all of it), this process's rows
        all_prompts, all_rewards, mine = gather_batch(repeated, rewards)
        shaped = shape_rewards(all_rewards, all_prompts, shaping, self.learner.running)[mine].to(self.backbone.device)
        return trajectory, rewards, shaped

    def state_dict(self) -> dict[str, Any]:
        """What every process shares: the value model, its optimiser and running statistics."""
        return {"learner": self.learner.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer_steps = int(state["optimizer_steps"])

    def process_state_dict(self) -> dict[str, Any]:
        return {"replay": self.learner.replay_state()}

    def load_process_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_replay(state["replay"])
