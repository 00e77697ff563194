"""AC-Flow (Fan et al. 2025, "Fine-tuning Flow Matching Generative Models with Intermediate
Feedback"; no official code): actor-critic fine-tuning of a flow model, built on its predecessor
ORW-CFM-W2 (Fan et al. 2025, "Online Reward-Weighted Fine-Tuning of Flow Matching with Wasserstein
Regularization").

Per collect: the current model samples ``samples_per_prompt`` images a prompt (its sampler, any
reward: no gradient of the reward is needed); rewards are shaped into a normalised signal r~
(running, per-batch or per-prompt standardisation). The critic V(x_t, t, prompt) regresses r~ from
intermediate states x_t = (1 - sigma) x_1 + sigma n of the samples (``timesteps_per_sample``
noisings a sample, a replay buffer of recent ones); for a flow model these have the law of its
trajectories' states at time t, and the regression's optimum is E[r~ | x_t], the value of the
state. Its inputs (``critic_inputs``, see genalign.finetuners.value): ``encoder`` (default), a
frozen CLIP on the decoded clean estimate x_t - sigma v_ref(x_t) with an MLP head, or ``latent``, a
small CNN with LayerNorm MLP on the latent.

Actor loss (:func:`ac_flow_actor_loss`), on the same states:

    mean_i w_i || v_theta(x_t^i, t_i) - (n_i - x_1^i) ||^2  +  alpha * mean_i || v_theta - v_ref ||^2

the reward-weighted conditional flow matching of ORW-CFM on the model's own samples with critic
weights w_i = f(clip(A_i, -c, c)), A_i = r~_i - V(x_t^i, t_i) (the sample's outcome relative to what
its intermediate state promised), f = exp(A / beta) or the clipped linear max(0, 1 + A / beta),
normalised to mean 1 over the batch, and the W2 regulariser (a bound on the Wasserstein-2 distance
to the reference model) that keeps diversity. With exponential weights the critic's factor
exp(-V(x_t) / beta) is constant given x_t, so the per-state optimum is ORW-CFM's tilt toward
p exp(r~ / beta); the critic rescales the signal state by state (dense, intermediate feedback) and
reduces its variance. Dual stability: advantages are clipped, and during ``critic_warmup`` optimizer
steps only the critic learns. The advantages use the critic's values from before it trains on the
batch (its held-out prediction, so it cannot have memorised these samples).

``relative: true`` trains on w - 1 instead of w (the weights minus their batch mean, so they sum to
zero): plain flow matching on the model's own samples, the part of the loss every sample shares,
drops out and below-average samples push the model away, bounded by the W2 term. This is the form
of the same authors' later ADRPO (A ||v - u||^2 + (beta0 - A) ||v - v_ref||^2). Self-training on
few-step guided samples is not a fixed point, so with w the model drifts and with w - 1 it does not
(docs/results.md).

Choices the papers leave open, documented here: the critic has its own Adam optimiser
(``critic_lr``) and ``critic_updates`` steps per collect, outside the trainer's optimizer (its state is
in the checkpoint through ``state_dict``); the actor's states use the backbone's training-timestep
law (SD3: logit-normal); the regression is on the conditional model (guidance applies to sampling
only). Works on any backbone with a training target (epsilon / v too), named for the flow case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from genalign.core.config import check, field
from genalign.core.types import Backbone, Conditioning, Reward
from genalign.finetuners import register
from genalign.finetuners.common import per_sample_mse
from genalign.finetuners.value import ValueMethod, check_value_settings, value_loss

# ------------------------------------------------------------------ the objective (pure functions)


def advantage_weights(advantages: Tensor, kind: str = "exponential", beta: float = 1.0, clip: float = 2.0,
                      relative: bool = False) -> Tensor:
    """(B,) weights with batch mean 1 from advantages (B,): clipped to [-clip, clip], then
    ``exp(A / beta)`` (exponential) or ``max(0, 1 + A / beta)`` (linear). All-zero linear weights
    stay zero (no sample is reinforced). ``relative``: minus their mean (w - 1, summing to zero), so
    samples below the batch's weight push the model away from them and plain flow matching on the
    model's own samples (the part every sample shares) drops out."""
    a = advantages.float().clamp(-clip, clip)
    if kind == "exponential":
        w = torch.exp(a / beta)
    elif kind == "linear":
        w = (1 + a / beta).clamp(min=0)
    else:
        raise ValueError(f"unknown weighting {kind!r}; expected exponential or linear")
    mean = w.mean()
    w = w / mean if mean > 0 else w
    return w - w.mean() if relative else w


def ac_flow_actor_loss(
    prediction: Tensor, target: Tensor, reference: Tensor, weights: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``mean(w * ||pred - target||^2) + alpha * mean(||pred - ref||^2)`` with per-sample mean
    squared errors; returns (loss, weighted flow-matching term, W2 term). Weights, targets and
    the reference prediction are constants."""
    fm = per_sample_mse(prediction, target.detach())
    w2 = per_sample_mse(prediction, reference.detach())
    weighted = (weights.detach().float() * fm).mean()
    regulariser = w2.mean()
    return weighted + alpha * regulariser, weighted, regulariser


# ------------------------------------------------------------------ the method


@dataclass
class ACFlowConfig:
    weighting: Literal["exponential", "linear"] = field("exponential", help="exp(A / beta) or max(0, 1 + A / beta)")
    beta: float = field(1.0, help="temperature of the weights (smaller: greedier)")
    clip_range: float = field(2.0, help="advantages are clipped to [-c, c] (dual stability)")
    alpha: float = field(1.0, help="W2 regulariser weight: alpha * ||v - v_ref||^2 (0: off; keeps diversity)")
    samples_per_prompt: int = field(4, help="images sampled per prompt per collect")
    timesteps_per_sample: int = field(2, help="noised states per sample in the actor loss (amortises sampling)")
    shaping: Literal["running", "batch", "prompt"] = field(
        "running", help="reward normalisation: running mean/std, per-batch, or per-prompt group standardisation")
    critic_warmup: int = field(20, help="optimizer steps during which only the critic learns")
    critic_lr: float = field(1e-3, help="critic Adam learning rate")
    critic_updates: int = field(4, help="critic Adam steps per collect")
    critic_batch: int = field(64, help="replay samples per critic step")
    replay_size: int = field(256, help="recent samples kept for the critic (0: only the current batch)")
    critic_width: int = field(128, help="critic MLP width")
    critic_inputs: Literal["encoder", "latent"] = field(
        "encoder", help="encoder: a frozen CLIP on the decoded clean estimate of the state (a prior that generalises); "
                        "latent: a small CNN on the latent state (memorises at small data)")
    critic_encoder: str = field("openai/clip-vit-large-patch14",
                                help="the CLIP of critic_inputs: encoder (transformers hub id or folder; open_clip hf-hub:)")
    coupling: Literal["independent", "trajectory"] = field(
        "independent", help="noise of the regressed states: fresh (conditional flow matching) or each sample's own "
                            "initial noise (the pair the sampler coupled; lower-variance targets)")
    relative: bool = field(False, help="train on w - 1 (weights minus their batch mean): only the advantage's "
                                       "deviation moves the actor, not plain flow matching on the model's own samples")

    def __post_init__(self) -> None:
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(self.clip_range > 0, f"clip_range must be > 0, got {self.clip_range}")
        check(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")
        check(self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        check(self.timesteps_per_sample >= 1, f"timesteps_per_sample must be >= 1, got {self.timesteps_per_sample}")
        check(self.shaping != "prompt" or self.samples_per_prompt >= 2,
              "shaping: prompt standardises each prompt's group; it needs samples_per_prompt >= 2")
        check_value_settings("critic", self.critic_warmup, self.critic_updates, self.critic_batch, self.critic_lr,
                             self.replay_size, self.critic_width)


class ActorTargets(NamedTuple):
    """What the actor regresses on: noised states x_t at ``timesteps``, the conditional branch,
    the flow-matching target, the reference model's prediction (None without the W2 term) and the
    advantage weights."""

    x_t: Tensor
    timesteps: Tensor
    cond: Conditioning
    target: Tensor
    reference: Tensor | None
    weights: Tensor


@dataclass
class ACFlowBatch:
    """The actor's targets (None while the critic warms up) and the collection's metrics."""

    actor: ActorTargets | None
    metrics: dict[str, Tensor]


@register("ac_flow")
class ACFlow(ValueMethod):
    summary = "AC-Flow (Fan et al. 2025): critic-weighted flow matching with a W2 regulariser"
    Config = ACFlowConfig
    name = "ac_flow"
    encoder_key = "critic_encoder"

    def __init__(self, config: ACFlowConfig, backbone: Backbone, reward: Reward | None, sample_config: Any,
                 encoder: Any = None):
        self._setup(config, backbone, reward, sample_config, needs_reference=config.alpha > 0,
                    inputs=config.critic_inputs, encoder=encoder,
                    width=config.critic_width, lr=config.critic_lr, replay_size=config.replay_size,
                    batch=config.critic_batch, updates=config.critic_updates, warmup=config.critic_warmup)

    # ---------------------------------------------------------------- critic

    def _noised(self, x1: Tensor, generator: torch.Generator, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, timesteps, noise) with the backbone's training-timestep law; fresh noise unless given."""
        timesteps = self.backbone.schedule.sample_training_timesteps(x1.shape[0], generator)
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator)
        noise = noise.float().to(x1.device)
        return self.backbone.schedule.add_noise(x1, noise, timesteps), timesteps, noise

    # ---------------------------------------------------------------- the FineTuner contract

    @torch.no_grad()
    def collect(self, prompts: list[str], generator: torch.Generator) -> ACFlowBatch:
        c = self.config
        trajectory, rewards, shaped = self.scored_rollout(prompts, c.samples_per_prompt, c.shaping, generator)
        x1, cond = trajectory.final.float(), trajectory.cond
        k = c.timesteps_per_sample
        x1_k, shaped_k = x1.repeat(k, *[1] * (x1.ndim - 1)), shaped.repeat(k)
        cond_k = cond.select(list(range(len(cond))) * k)
        coupled = trajectory.latents[0].float().repeat(k, *[1] * (x1.ndim - 1)) if c.coupling == "trajectory" else None
        x_t, timesteps, noise = self._noised(x1_k, generator, coupled)

        # the critic's values of these new states before it trains on them: its held-out error, and
        # the baseline of the advantages (it cannot have memorised these samples)
        features = self.learner.featurize(x_t, timesteps, cond_k)
        values = self.learner.value(features)
        new_error = float(value_loss(values, shaped_k))
        self.learner.remember({**features, "target": shaped_k})
        critic_loss = self.learner.train(generator)

        metrics = {"reward_mean": rewards.mean(), "reward_std": rewards.std(unbiased=False),
                   "critic_loss": torch.tensor(critic_loss), "critic_error_new": torch.tensor(new_error),
                   "warmup": torch.tensor(float(self.warming_up))}
        if self.warming_up:
            return ACFlowBatch(None, metrics)

        advantages = shaped_k - values
        weights = advantage_weights(advantages, c.weighting, c.beta, c.clip_range, c.relative)
        target = self.backbone.schedule.training_target(x1_k, noise, timesteps).float()
        cond_k = _positive_only(cond_k)
        reference = None
        if c.alpha > 0:
            with self.backbone.reference():
                reference = self.backbone.predict(x_t.to(self.backbone.dtype), timesteps, cond_k).float()
        metrics.update({"advantage_mean": advantages.mean(), "advantage_std": advantages.std(unbiased=False),
                        "weight_max": weights.max()})
        return ACFlowBatch(ActorTargets(x_t, timesteps, cond_k, target, reference, weights), metrics)

    def loss(self, batch: ACFlowBatch) -> tuple[Tensor, dict[str, Tensor]]:
        metrics = dict(batch.metrics)
        if batch.actor is None:
            return self.zero_loss(), metrics
        x_t, timesteps, cond, target, reference, weights = batch.actor
        with self.backbone.training():
            prediction = self.backbone.predict(x_t.to(self.backbone.dtype), timesteps, cond).float()
        if reference is None:
            reference = prediction.detach()
        loss, weighted, w2 = ac_flow_actor_loss(prediction, target, reference, weights, self.config.alpha)
        metrics.update({"fm_weighted": weighted.detach(), "w2": w2.detach()})
        return loss, metrics

def _positive_only(cond: Conditioning) -> Conditioning:
    """The conditional branch alone (the regression is on the conditional model)."""
    return Conditioning(cond.positive, None, cond.prompts)
