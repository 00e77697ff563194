"""VARD (Dai et al. 2025, "VARD: Efficient and Dense Fine-Tuning for Diffusion Models with
Value-based RL"; no official code): a value model that predicts the final reward from intermediate
states gives dense, differentiable supervision at every denoising step, so any reward works (JPEG
compressibility, detector rewards, the shapes world's exact evaluator), with a KL regulariser to
the pretrained model.

Value model V_phi(x_t, t, prompt), trained by regression on Monte-Carlo returns: every state of
the model's own stochastic trajectories is paired with the (shaped) reward of the trajectory's final
image (:func:`value_regression_loss`), from a replay buffer of recent trajectories. Its inputs
(``value_inputs``, genalign.finetuners.value): ``encoder`` (default), a frozen CLIP on the decoded
one-step clean estimate of the frozen reference at the state, with an MLP head on [image, prompt,
their product, cosine, t] (:class:`~genalign.finetuners.value.CleanEstimateFeatures`,
:class:`~genalign.finetuners.value.EmbeddingValueHead`); ``latent``, a small CNN on the latent
itself (:class:`~genalign.finetuners.value.ValueModel`). docs/results.md compares the two.

Policy objective per trained step k (:func:`vard_policy_loss`), with x_k from a stored trajectory,
the policy's Gaussian step N(mu_theta(x_k), s_k^2) reparameterised with the trajectory's own noise
eps_k (so at the start it reproduces x_{k+1} exactly):

    x~_{k+1} = mu_theta(x_k) + s_k eps_k
    loss_k   = -V_phi(x~_{k+1}, t_{k+1}) + kl_weight * KL(N(mu_theta, s_k^2) || N(mu_ref, s_k^2))

KL = ||mu_theta - mu_ref||^2 / (2 s_k^2) (per element mean), the closed form between the policy's
and the reference's steps (``sampling.gaussian_kl_equal_std``); the value model is frozen in this
loss. Gradients reach the denoiser through one step only (no backpropagation through the chain).

Alternation (the paper alternates value and policy learning): each collect samples trajectories,
scores them, takes ``value_updates`` Adam steps of the value model on the replay buffer, then the
trainer takes one policy step; during ``value_warmup`` optimizer steps only the value model learns.
The KL sets how far a step may move: minimising ``-V + kl_weight * KL`` over the step's mean
alone gives mu = mu_ref + s_k^2 * numel * dV/dx~ / kl_weight (the per-element mean KL), a trust
region in units of the step's variance. ``value_gradient: normalized`` gives every sample the same
step instead (then the KL binds only at kl_weight of order s_k^2 / the wanted shift). Defaults are
those of configs/shapes/vard.yaml's measurements (docs/results.md).

Choices left open by the paper, made here: deterministic steps (std 0: the last DDIM-eta-1 step, the
flow SDE's step into sigma = 0) are not trained (no KL is defined there); rewards are standardised
(running mean/std by default) so the value model's targets are well scaled; the value model has its
own optimiser, saved in checkpoints through ``state_dict``. Works with any backbone whose sampler is
stochastic (``sample.eta > 0``: DDIM eta for SD, the SDE noise level for flow models).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from genalign.core import sampling
from genalign.core.config import ConfigError, check, field
from genalign.core.distributed import mean_over_processes
from genalign.core.types import Backbone, Conditioning, Reward, Trajectory
from genalign.finetuners import register
from genalign.finetuners.common import LossInParts
from genalign.finetuners.value import ValueMethod, check_value_settings, value_loss

# ------------------------------------------------------------------ the objectives (pure functions)


def value_regression_loss(predicted: Tensor, returns: Tensor) -> Tensor:
    """Monte-Carlo value regression: mean (V(x_t) - R)^2 over states (every state of a trajectory
    carries its trajectory's final shaped reward R)."""
    return value_loss(predicted, returns)


def vard_policy_loss(values: Tensor, mean_policy: Tensor, mean_reference: Tensor, std: Tensor | float,
                     kl_weight: float) -> tuple[Tensor, Tensor]:
    """``mean(-V(x~_{k+1})) + kl_weight * mean(KL)`` over samples; values (B,), step means (B, ...),
    ``std`` > 0 the step's standard deviation. Returns (loss, KL per sample (B,))."""
    kl = sampling.gaussian_kl_equal_std(mean_policy.float(), mean_reference.detach().float(), std)
    return -values.float().mean() + kl_weight * kl.mean(), kl


def normalized_value_surrogate(values: Tensor, states: Tensor) -> Tensor:
    """(B,) ``mean(x~ * g / rms(g))`` per sample, g = dV/dx~ (a constant here): its gradient in the
    state is the value's gradient direction with the same size for every sample (1 / numel per
    element), so a few samples with huge value gradients cannot dominate an update."""
    (grad,) = torch.autograd.grad(values.sum(), states, retain_graph=True)
    rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    direction = (grad / rms.view(-1, *[1] * (grad.ndim - 1))).detach()
    return (states.float() * direction).flatten(1).mean(1)


def adapt_kl_weight(weight: float, kl: float, target: float) -> float:
    """PPO's adaptive KL penalty (Schulman et al. 2017, section 4): halve the weight when the
    measured KL is below target / 1.5, double it when above target * 1.5, else keep it."""
    if kl < target / 1.5:
        return weight / 2
    if kl > target * 1.5:
        return weight * 2
    return weight


# ------------------------------------------------------------------ the method


@dataclass
class VARDConfig:
    kl_weight: float = field(
        0.5, help="weight of the closed-form KL to the reference step: a trust region in units of the step's variance "
                  "(measured on the shapes world: 0.3 to 1 gained alike; 0.1 over-optimised the value)")
    steps_per_update: int = field(4, help="denoising steps trained per policy update (random among stochastic ones)")
    trained_fraction: float = field(
        1.0, help="policy updates draw from the first fraction of the stochastic steps (the value's gradient guides "
                  "best early; measured in configs/shapes/vard.yaml)")
    kl_target: float = field(
        0.0, help="> 0: adapt kl_weight after every policy step to hold the mean per-step KL near this (PPO's "
                  "adaptive penalty: x2 above 1.5 x target, / 2 below target / 1.5, within 16x of kl_weight); 0: fixed")
    kl_adapt: Literal["both", "tighten"] = field(
        "both", help="both: the adapted weight ranges from kl_weight / 16 to 16 x kl_weight (PPO); tighten: never below "
                     "kl_weight, so the target is a ceiling on the KL rather than a set point (on the shapes world "
                     "neither beat a fixed weight)")
    value_gradient: Literal["raw", "normalized"] = field(
        "raw", help="raw: maximise V (the paper); normalized: follow V's gradient direction with the same step size "
                    "for every sample (normalized_value_surrogate)")
    samples_per_prompt: int = field(2, help="trajectories per prompt per collect")
    shaping: Literal["running", "batch", "prompt", "none"] = field(
        "running", help="reward standardisation for the value targets (none: raw rewards)")
    value_warmup: int = field(20, help="optimizer steps during which only the value model learns")
    value_lr: float = field(1e-3, help="value model Adam learning rate")
    value_updates: int = field(4, help="value model Adam steps per collect")
    value_batch: int = field(128, help="replay states per value step")
    replay_size: int = field(2048, help="recent states kept for the value model (0: only the current batch)")
    value_width: int = field(128, help="value model MLP width")
    value_inputs: Literal["encoder", "latent"] = field(
        "encoder", help="encoder: a frozen CLIP on the decoded clean estimate of the state (a prior that generalises); "
                        "latent: a small CNN on the latent state (memorises at small data)")
    value_encoder: str = field("openai/clip-vit-large-patch14",
                               help="the CLIP of value_inputs: encoder (transformers hub id or folder; open_clip hf-hub:)")

    def __post_init__(self) -> None:
        check(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")
        check(self.kl_target >= 0, f"kl_target must be >= 0, got {self.kl_target}")
        check(self.kl_target == 0 or self.kl_weight > 0, "kl_target adapts kl_weight multiplicatively: set kl_weight > 0")
        check(self.steps_per_update >= 1, f"steps_per_update must be >= 1, got {self.steps_per_update}")
        check(0 < self.trained_fraction <= 1, f"trained_fraction must be in (0, 1], got {self.trained_fraction}")
        check(self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        check(self.shaping != "prompt" or self.samples_per_prompt >= 2,
              "shaping: prompt standardises each prompt's group; it needs samples_per_prompt >= 2")
        check_value_settings("value", self.value_warmup, self.value_updates, self.value_batch, self.value_lr,
                             self.replay_size, self.value_width)


@dataclass
class VARDBatch:
    """The rollout and the stochastic steps the policy trains on (no trajectory while the value
    model warms up), and the collection's metrics."""

    trajectory: Trajectory | None
    steps: list[int]
    metrics: dict[str, Tensor]


@register("vard")
class VARD(LossInParts, ValueMethod):
    summary = "VARD (Dai et al. 2025): a value model of intermediate states gives dense reward gradients"
    Config = VARDConfig
    name = "vard"
    encoder_key = "value_encoder"

    def __init__(self, config: VARDConfig, backbone: Backbone, reward: Reward | None, sample_config: Any,
                 encoder: Any = None):
        if sample_config.eta <= 0:
            raise ConfigError("vard needs stochastic steps (a KL between Gaussian steps): set sample.eta > 0 "
                              "(SD: DDIM eta 1; flow models: an SDE noise level such as 0.7)")
        self._setup(config, backbone, reward, sample_config, needs_reference=True, inputs=config.value_inputs,
                    encoder=encoder, width=config.value_width,
                    lr=config.value_lr, replay_size=config.replay_size, batch=config.value_batch,
                    updates=config.value_updates, warmup=config.value_warmup)
        self.kl_weight = config.kl_weight  # adapted when kl_target > 0
        self._step_kls: list[Tensor] = []  # the mean KL of each policy loss since the last optimizer step

    # ---------------------------------------------------------------- value model

    def _states(self, trajectory: Trajectory) -> tuple[Tensor, Tensor]:
        """Every state after the first with its timestep: (K * B, ...) and (K * B,)."""
        num_steps, batch = trajectory.num_steps, trajectory.latents.shape[1]
        after = torch.stack([self.backbone.schedule.previous_timestep(t, num_steps) for t in trajectory.timesteps])
        states = trajectory.latents[1:].reshape(num_steps * batch, *trajectory.latents.shape[2:])
        return states.float(), after.float().repeat_interleave(batch)

    # ---------------------------------------------------------------- the FineTuner contract

    @torch.no_grad()
    def collect(self, prompts: list[str], generator: torch.Generator) -> VARDBatch:
        c = self.config
        trajectory, rewards, returns = self.scored_rollout(prompts, c.samples_per_prompt, c.shaping, generator)
        states, timesteps = self._states(trajectory)
        batch = trajectory.latents.shape[1]
        features = self.learner.featurize(states, timesteps, trajectory.cond.select(list(range(batch)) * trajectory.num_steps))
        returns_k = returns.repeat(trajectory.num_steps)
        # the value model's error on these new trajectories before it trains on them (held out)
        new_error = float(value_regression_loss(self.learner.value(features), returns_k))
        self.learner.remember({**features, "target": returns_k})
        value_train_loss = self.learner.train(generator)
        metrics = {"reward_mean": rewards.mean(), "value_loss": torch.tensor(value_train_loss),
                   "value_error_new": torch.tensor(new_error), "warmup": torch.tensor(float(self.warming_up))}
        if self.warming_up:
            return VARDBatch(None, [], metrics)
        stochastic = [k for k in range(trajectory.num_steps) if bool((trajectory.stds[k] > 0).any())]
        if not stochastic:
            raise ConfigError("no stochastic step in the trajectory: raise sample.eta")
        stochastic = stochastic[: max(1, round(c.trained_fraction * len(stochastic)))]
        order = torch.randperm(len(stochastic), generator=generator)[: c.steps_per_update]
        steps = sorted(stochastic[i] for i in order.tolist())
        return VARDBatch(trajectory, steps, metrics)

    def _step_mean(self, trajectory: Trajectory, k: int, cond: Conditioning) -> Tensor:
        x = trajectory.latents[k]
        output = self.backbone.predict(x, trajectory.timesteps[k], cond, trajectory.guidance_scale)
        step = self.backbone.schedule.step(x, output, trajectory.timesteps[k], trajectory.num_steps, trajectory.eta_at(k),
                                           prev_sample=trajectory.latents[k + 1], sde=trajectory.sde)
        return step.mean.float()

    def _loss_parts(self, batch: VARDBatch, metrics: dict[str, Tensor]) -> Iterator[Tensor]:
        """The per-step policy losses, each divided by the number of trained steps (LossInParts):
        with encoder value inputs each step's graph holds a VAE decode and a CLIP pass."""
        metrics.update(batch.metrics)
        if batch.trajectory is None:
            yield self.zero_loss()
            return
        trajectory, steps = batch.trajectory, batch.steps
        kls, values = [], []
        self.learner.model.requires_grad_(False)
        try:
            for k in steps:
                std = trajectory.stds[k].float()
                noise = (trajectory.latents[k + 1].float() - trajectory.means[k].float()) / std
                with torch.no_grad(), self.backbone.reference():
                    mean_reference = self._step_mean(trajectory, k, trajectory.cond)
                with self.backbone.training():
                    mean_policy = self._step_mean(trajectory, k, trajectory.cond)
                next_state = mean_policy + std * noise
                after = self.backbone.schedule.previous_timestep(trajectory.timesteps[k], trajectory.num_steps)
                value = self.learner(next_state, torch.as_tensor(after).expand(next_state.shape[0]), trajectory.cond)
                objective = value
                if self.config.value_gradient == "normalized":
                    objective = normalized_value_surrogate(value, next_state)
                loss_k, kl = vard_policy_loss(objective, mean_policy, mean_reference, std, self.kl_weight)
                kls.append(kl.detach().mean())
                values.append(value.detach().mean())
                yield loss_k / len(steps)
        finally:
            self.learner.model.requires_grad_(True)
        kl_mean = torch.stack(kls).mean()
        self._step_kls.append(kl_mean)
        metrics.update({"kl": kl_mean, "value_policy": torch.stack(values).mean(),
                        "steps_trained": torch.tensor(float(len(steps))), "kl_weight": torch.tensor(self.kl_weight)})

    def after_optimizer_step(self) -> None:
        """With ``kl_target``: adapt the KL weight to the KL of the step just taken (the mean over
        its micro-batches and over processes, so every process keeps the same weight)."""
        super().after_optimizer_step()
        kls, self._step_kls = self._step_kls, []
        if self.config.kl_target > 0 and kls:
            kl = mean_over_processes(torch.stack(kls).detach().float().mean())
            weight = adapt_kl_weight(self.kl_weight, float(kl), self.config.kl_target)
            # within 16x of the configured weight: a few steps recover from any excursion
            lowest = self.config.kl_weight if self.config.kl_adapt == "tighten" else self.config.kl_weight / 16
            self.kl_weight = min(max(weight, lowest), self.config.kl_weight * 16)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kl_weight": self.kl_weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kl_weight = float(state.get("kl_weight", self.config.kl_weight))

