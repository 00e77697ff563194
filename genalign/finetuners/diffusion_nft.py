"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process"; official code NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``): online RL on the
forward process. No likelihoods, no SDE: any sampler (deterministic by default), and the policy
is trained by flow matching on its own clean samples, contrasting an implicit positive and an
implicit negative policy around the sampling ("old") policy.

Per collect: the old policy samples ``samples_per_prompt`` images a prompt (guidance
``sample.guidance_scale``; the paper trains CFG-free, guidance 1); rewards become optimality
probabilities (:func:`optimality`): A = (R - mean of the prompt's group) / (std + 1e-4), the std
over the whole batch (``global_std``, gathered over processes), A clipped to [-c, c] (c =
``adv_clip_max``, 5) and r = clamp(A / (2c) + 1/2, 0, 1). Each sample is noised at
``timesteps_per_sample`` timesteps of the sampling grid (a random subset a sample; official: 9 of
10), x_t = (1 - t) x_0 + t n with fresh noise. Loss at each (sample, t) (:func:`nft_loss`):

    v+ = beta v_theta + (1 - beta) v_old,     v- = (1 + beta) v_old - beta v_theta
    x0+- = the clean estimate of x_t under v+-  (flow: x_t - t v+-)
    L+- = mean_d (x0+- - x_0)^2 / sg(max(mean_d |x0+- - x_0|, 1e-5))      (adaptive weighting)
    loss = loss_scale * mean_i [r_i L+_i + (1 - r_i) L-_i] / beta  +  kl_weight * mean (v_theta - v_ref)^2

so a sample better than its group pulls v_theta's positive mix toward its clean image and a worse
one pushes it away (minimising L- moves v_theta opposite). The mixes are linear in the model's
output, so the same loss applies to epsilon / v diffusion backbones through their clean estimate.
Defaults are the official SD3.5-M GenEval ones: beta 1, c 5, loss_scale 5 (the official policy
loss's factor), kl_weight 1e-4 (MSE to the base model's output), 9 timesteps a sample.

The old policy is a copy of the trainable weights that samples and gives v_old; after each
optimizer step it moves toward the policy, old <- d old + (1 - d) theta with d = min(uprate (step -
flat), uphold) (0 before ``old_flat`` steps; official: flat 0, uprate 0.001, uphold 0.5). It is
saved in checkpoints. The loss over a sample's timesteps is their mean (each is backwarded as soon
as it is computed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from genalign.core.config import ConfigError, check, field
from genalign.core.distributed import gather_batch
from genalign.core.rollout import rollout
from genalign.core.types import Backbone, Conditioning, Reward
from genalign.finetuners import register
from genalign.finetuners.common import BackboneMethod, LossInParts, OverlappedScores, ShadowParameters
from genalign.finetuners.flow_grpo import group_advantages
from genalign.finetuners.policy_gradient import read_prompt_metadata, zero_spread_share

# ------------------------------------------------------------------ the objective (pure functions)


def optimality(advantages: Tensor, adv_clip_max: float = 5.0) -> Tensor:
    """r = clamp(clip(A, -c, c) / (2c) + 1/2, 0, 1): the optimality probability of each sample."""
    return (advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def nft_loss(estimate_pos: Tensor, estimate_neg: Tensor, x0: Tensor, r: Tensor, beta: float) -> Tensor:
    """(B,) the NFT loss per sample, [r L+ + (1 - r) L-] / beta, from the clean estimates of the
    implicit positive and negative policies; L = mean_d (x0_hat - x0)^2 / sg(max(mean_d |x0_hat -
    x0|, 1e-5)) (the weight in float64, detached)."""
    dims = tuple(range(1, x0.ndim))

    def weighted(estimate: Tensor) -> Tensor:
        error = estimate.float() - x0.float()
        scale = error.detach().double().abs().mean(dim=dims).clamp(min=1e-5).float()
        return error.pow(2).mean(dim=dims) / scale

    return (r * weighted(estimate_pos) + (1 - r) * weighted(estimate_neg)) / beta


def implicit_policies(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(v+, v-) = (beta v_theta + (1 - beta) v_old, (1 + beta) v_old - beta v_theta)."""
    return beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta


def old_decay(step: int, flat: int = 0, uprate: float = 0.001, uphold: float = 0.5) -> float:
    """d of old <- d old + (1 - d) theta after optimizer step ``step``: 0 before ``flat`` steps,
    then min(uprate (step - flat), uphold)."""
    return 0.0 if step < flat else min(uprate * (step - flat), uphold)


# ------------------------------------------------------------------ the method


@dataclass
class DiffusionNFTConfig:
    samples_per_prompt: int = field(24, help="images a prompt in a rollout (the group; official: 24)")
    beta: float = field(1.0, help="the implicit policies' mixing strength (official: 1; 0.1 for OCR and multi-reward)")
    adv_clip_max: float = field(5.0, help="advantages clipped to [-c, c]; r = clip(A) / (2c) + 1/2")
    global_std: bool = field(True, help="normalise advantages by the whole batch's std (official) or the group's")
    timesteps_per_sample: int = field(
        9, help="timesteps of the sampling grid a sample is trained at, drawn at random (official: 9 of 10)")
    loss_scale: float = field(5.0, help="factor of the policy loss (the official code's 5)")
    kl_weight: float = field(1.0e-4, help="weight of mean (v_theta - v_ref)^2 to the base model (official: 1e-4)")
    old_flat: int = field(0, help="optimizer steps during which the old policy copies the policy (d = 0)")
    old_uprate: float = field(0.001, help="d grows by this each optimizer step after old_flat (official: 0.001)")
    old_uphold: float = field(0.5, help="d's ceiling (official: 0.5; 0.999 for OCR)")
    sample_batch_size: int = field(0, help="images per sampling call (0: the whole rollout at once)")
    prompt_metadata: str | None = field(
        None, help="JSONL of metadata rows with a 'prompt' each (GenEval's format): its prompts are the training "
                   "prompts and each image's row goes to the reward (the geneval reward needs it)")

    def __post_init__(self) -> None:
        check(self.samples_per_prompt >= 2, f"samples_per_prompt must be >= 2 (a group), got {self.samples_per_prompt}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(self.adv_clip_max > 0, f"adv_clip_max must be > 0, got {self.adv_clip_max}")
        check(self.timesteps_per_sample >= 1, f"timesteps_per_sample must be >= 1, got {self.timesteps_per_sample}")
        check(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")
        check(0 <= self.old_uphold < 1, f"old_uphold must be in [0, 1), got {self.old_uphold}")
        check(self.old_uprate >= 0 and self.old_flat >= 0, "old_uprate and old_flat must be >= 0")


@dataclass
class NFTBatch:
    """Clean samples x0 (B, ...) with their optimality r (B,), the training timesteps (K, B), noise
    (K, B, ...) and the old policy's outputs there (K, B, ...), and the conditional branch."""

    x0: Tensor
    r: Tensor
    timesteps: Tensor
    noise: Tensor
    v_old: Tensor
    cond: Conditioning
    metrics: dict[str, Tensor]


@register("diffusion_nft")
class DiffusionNFT(LossInParts, BackboneMethod):
    """DiffusionNFT: online RL on the forward process with implicit positive / negative policies."""

    name = "diffusion_nft"
    summary = "DiffusionNFT (Zheng et al. 2025): online RL on the forward process, no likelihoods"
    Config = DiffusionNFTConfig

    def __init__(self, config: DiffusionNFTConfig, backbone: Backbone, reward: Reward | None, sample_config: Any):
        if reward is None:
            raise ConfigError("diffusion_nft needs a reward (any, differentiable or not); configure reward.name")
        self.config, self.backbone, self.reward, self.sample_config = config, backbone, reward, sample_config
        self.params = backbone.named_trainable_parameters()
        if not self.params:
            raise ConfigError("diffusion_nft trains the backbone: set backbone.finetune to lora or full")
        if sample_config.num_steps < 2:
            raise ConfigError("diffusion_nft trains at the sampling grid's timesteps: sample.num_steps must be >= 2")
        if config.kl_weight > 0:
            backbone.keep_reference()
        self.old = ShadowParameters(self.params, backbone.unwrapped_denoiser)
        self.optimizer_steps = 0
        self.metadata = read_prompt_metadata(config.prompt_metadata) if config.prompt_metadata else {}

    @classmethod
    def build(cls, experiment: Any, backbone: Backbone | None, reward: Reward | None) -> DiffusionNFT:
        if backbone is None:
            raise ConfigError("diffusion_nft needs a backbone: set backbone.family and backbone.path")
        return cls(experiment.method, backbone, reward, experiment.sample)

    def training_data(self) -> list[str] | None:
        """The prompts of ``prompt_metadata`` (each row once) when given, else run.prompts."""
        return list(self.metadata) if self.metadata else None

    # ---------------------------------------------------------------- collect

    @torch.no_grad()
    def collect(self, prompts: list[str], generator: torch.Generator) -> NFTBatch:
        c, s = self.config, self.sample_config
        grid = self.backbone.schedule.timesteps(s.num_steps).to(self.backbone.device)
        k = min(c.timesteps_per_sample, len(grid))
        repeated = [p for p in prompts for _ in range(c.samples_per_prompt)]  # as rollout orders them
        metadata = None
        if self.metadata:
            missing = [p for p in repeated if p not in self.metadata]
            if missing:
                raise ConfigError(f"{self.name}: prompt {missing[0]!r} has no row in {c.prompt_metadata}")
            metadata = [self.metadata[p] for p in repeated]
        # a served reward scores each chunk while the next is sampled and v_old computed; the same scores
        overlapped = OverlappedScores.for_reward(self.reward, repeated, metadata)
        with overlapped or nullcontext(), self.old.swapped():  # the old policy samples and gives v_old there
            r = rollout(self.backbone, prompts, s.num_steps, s.guidance_scale, s.eta, samples_per_prompt=c.samples_per_prompt,
                        generator=generator, chunk_size=c.sample_batch_size or None, sde=s.sde, on_chunk=overlapped)
            x0 = r.trajectory.final.float()
            picks = torch.stack([torch.randperm(len(grid), generator=generator)[:k] for _ in range(len(x0))], dim=1)
            timesteps = grid[picks.to(grid.device)]  # (K, B)
            noise = torch.randn((k, *x0.shape), generator=generator).to(x0)
            cond = Conditioning(r.cond.positive, None, r.cond.prompts)  # the conditional model is trained
            v_old = torch.stack([self.backbone.predict(self._noised(x0, noise[j], timesteps[j]), timesteps[j], cond).float()
                                 for j in range(k)])
            if overlapped is not None:
                rewards = overlapped.result()
        if overlapped is None:
            rewards = self.reward(r.images, r.prompts, metadata)[0].detach().float().cpu()
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError(f"{self.name}: the reward is not finite for some samples")
        # group statistics over the whole data-parallel batch, then this process's rows
        all_prompts, all_rewards, mine = gather_batch(r.prompts, rewards)
        advantages = group_advantages(all_rewards, all_prompts, c.global_std)
        optimal = optimality(advantages[mine], c.adv_clip_max).to(self.backbone.device)
        metrics = {"reward_mean": rewards.mean(), "reward_std": rewards.std(unbiased=False),
                   "optimality_mean": optimal.mean().cpu(),
                   "zero_spread_groups": torch.tensor(zero_spread_share(all_prompts, all_rewards))}
        return NFTBatch(x0, optimal, timesteps, noise, v_old, cond, metrics)

    def _noised(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.backbone.schedule.add_noise(x0, noise, timesteps).to(self.backbone.dtype)

    # ---------------------------------------------------------------- loss

    def _loss_parts(self, batch: NFTBatch, metrics: dict[str, Tensor]) -> Iterator[Tensor]:
        """One part a training timestep (the sample's j-th), each divided by their number."""
        c, schedule = self.config, self.backbone.schedule
        metrics.update(batch.metrics)
        k = batch.timesteps.shape[0]
        policy_total, kl_total = 0.0, 0.0
        for j in range(k):
            t = batch.timesteps[j]
            x_t = self._noised(batch.x0, batch.noise[j], t)
            with self.backbone.training():
                v_theta = self.backbone.predict(x_t, t, batch.cond).float()
            v_pos, v_neg = implicit_policies(v_theta, batch.v_old[j], c.beta)
            x_t32 = x_t.float()
            per_sample = nft_loss(schedule.clean_estimate(x_t32, v_pos, t), schedule.clean_estimate(x_t32, v_neg, t),
                                  batch.x0, batch.r, c.beta)
            part = c.loss_scale * per_sample.mean()
            policy_total += float(part.detach()) / k
            if c.kl_weight > 0:
                with torch.no_grad(), self.backbone.reference():
                    v_ref = self.backbone.predict(x_t, t, batch.cond).float()
                kl = (v_theta - v_ref).pow(2).mean()
                kl_total += float(kl.detach()) / k
                part = part + c.kl_weight * kl
            yield part / k
        metrics.update({"policy_loss": torch.tensor(policy_total), "kl": torch.tensor(kl_total)})

    # ---------------------------------------------------------------- the old policy

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        c = self.config
        self.old.update(1.0 - old_decay(self.optimizer_steps, c.old_flat, c.old_uprate, c.old_uphold))

    def state_dict(self) -> dict[str, Any]:
        return {"old": self.old.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old.load_state_dict(state["old"])
        self.optimizer_steps = int(state["optimizer_steps"])
