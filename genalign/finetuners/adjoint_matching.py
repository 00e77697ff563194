"""Adjoint Matching (Domingo-Enrich et al. 2024, "Adjoint Matching: Fine-tuning Flow and Diffusion
Generative Models with Memoryless Stochastic Optimal Control"; no official code): fine-tune toward
p_base(x) exp(lambda r(x)) by regressing the model's control onto a lean adjoint computed along
its own memoryless-SDE samples.

Conventions (the paper's): time t runs from 0 (noise) to 1 (data), X_t = t X_1 + (1 - t) X_0, the
velocity u = dX/dt. diffusers' flow models use sigma = 1 - t and predict v = -u
(``genalign.core.sampling.sigma_to_data_time`` / ``velocity_to_data_time``).

The SDE with the base model's marginals for any diffusion coefficient sigma(t) (paper, Eq. 7, with
eta_t grad log p_t = u - kappa_t x written through the noise estimate x_0_hat = x - t u):

    dX = b(X, t) dt + sigma(t) dB,   b = u - sigma(t)^2 / 2 * (x - t u) / (1 - t)

Memoryless schedule sigma(t)^2 = 2 eta_t = 2 (1 - t) / t makes X_0 and X_1 independent; then
b = 2 u - x / t, the issue's form. It diverges at t = 0; the paper (App. G.1) evaluates it with an
offset h (one step): sigma(t)^2 = 2 (1 - t + h) / (t + h). Euler-Maruyama steps
X_{t+h} = X_t + h b + sqrt(h) sigma(t) noise, as the paper samples. Written this way the t = 0
singularity is confined to sigma (no kappa_t = 1/t in the drift), and on a 1-D Gaussian the base
model's samples keep unit variance to 1% with 10 steps.

Per rollout (no gradient through the sampler, so memory is flat in the number of steps):
1. sample X_0 .. X_1 with the current fine-tuned model (its drift b_ft);
2. lean adjoint (Eq. 38-39): a_1 = -lambda grad r(X_1) (optionally at the model's one-step clean
   estimate from the state before X_1, ``terminal: clean_estimate``), and backwards
   a_{t} = a_{t+h} + h a_{t+h}^T d b_base(X_t, t) / dx, which is exactly the vector-Jacobian product
   of the base model's Euler step mean x + h b_base(x) (what :func:`lean_adjoint` computes);
3. loss (Eq. 37/42) on a subset of the steps, everything but the fine-tuned model detached:
   || (b_ft - b_base) / sigma + sigma a ||^2 = || (2 / sigma) (u_ft - u_base) + sigma a ||^2 for the
   memoryless flow SDE (:func:`adjoint_matching_loss`).

The SDE comes from the backbone's noise schedule (``NoiseSchedule.memoryless_sde``,
``genalign.core.sde``): the flow SDE above for flow models; for diffusion (epsilon / v) backbones
the DDPM step (DDIM eta = 1, the memoryless schedule of VP diffusion) read as drift = (step mean -
x) / h and sigma = std / sqrt(h), with h the step's share of the training timesteps, the paper's
DDIM form of the loss. The method itself never asks which family it trains.

Paper choices kept: the timestep subset (all late steps, a random draw of early steps, App. G.2),
per-sample loss clipping at c lambda^2 (App. G.3: c = 1.6 on the paper's summed norm; ours is on the
mean over latent elements, so c is a separate setting, off by default), the offset h.
Choices the paper leaves open: classifier-free guidance applies to fine-tuned and base model alike
(the control is the difference of the guided drifts); the loss is a per-element mean (sum over
steps, mean over samples) so the learning rate does not depend on the latent size; the control of
the step from X_k is matched to the adjoint of X_{k+1}, the state the step lands on (the exact
optimum of the discrete Euler-Maruyama chain; the paper's same-t pairing is its h -> 0 limit, and
with 10 steps it lands the 1-D Gaussian tilt of ``tests/test_adjoint_matching.py`` at 1.17 instead
of 1.5). The sampler's ``eta`` is not used: the SDE is the method's (``noise_schedule``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from genalign.core.config import ConfigError, changed_options, check, field
from genalign.core.sampler import initial_noise
from genalign.core.sde import SDE, marginal_drift, memoryless_sigma  # noqa: F401 - the paper's math, re-exported
from genalign.core.types import Backbone, Conditioning, Reward
from genalign.finetuners import register
from genalign.finetuners.common import BackboneMethod, LossInParts

# ------------------------------------------------------------------ the math (pure functions)


def adjoint_matching_loss(
    drift_ft: Tensor, drift_base: Tensor, adjoint: Tensor, sigma: float | Tensor, clip: float | None = None
) -> Tensor:
    """(B,) ``|| (drift_ft - drift_base) / sigma + sigma * adjoint ||^2``, mean over non-batch elements,
    clipped per sample at ``clip`` (None: no clipping). For the memoryless flow SDE
    (drift 2 u - x / t) this is the paper's ``|| (2 / sigma) (u_ft - u_base) + sigma a ||^2``.
    ``drift_base`` and ``adjoint`` are treated as constants (detached)."""
    residual = (drift_ft.float() - drift_base.detach().float()) / sigma + sigma * adjoint.detach().float()
    loss = residual.pow(2).mean(dim=tuple(range(1, residual.ndim)))
    return loss.clamp(max=clip) if clip is not None else loss


def lean_adjoint(
    states: Tensor, terminal: Tensor, step_mean: Callable[[Tensor, int], Tensor], first: int = 0
) -> dict[int, Tensor]:
    """The lean adjoint along a stored trajectory: ``{k: a_k}`` for ``first <= k <= K``.

    states: (K+1, B, ...) the trajectory (states[0] = X_0 noise, states[K] = X_1).
    terminal: (B, ...) a_K, e.g. ``-lambda * grad r(X_1)``.
    step_mean(x, k): the base model's step mean x + h_k b_base(x, t_k), differentiable in x.
    a_k = a_{k+1}^T d step_mean(x_k, k) / dx_k = a_{k+1} + h_k a_{k+1}^T db_base/dx: one vector-Jacobian
    product per step, no graph kept between steps.
    """
    num_steps = states.shape[0] - 1
    adjoints = {num_steps: terminal.detach()}
    a = terminal.detach()
    for k in range(num_steps - 1, first - 1, -1):
        x = states[k].detach().requires_grad_(True)
        with torch.enable_grad():
            mean = step_mean(x, k)
            (a,) = torch.autograd.grad(mean, x, grad_outputs=a.to(mean.dtype))
        a = a.detach()
        adjoints[k] = a
    return adjoints


def timestep_subset(num_steps: int, num_early: int, late_fraction: float,
                    generator: torch.Generator | None = None) -> list[int]:
    """Step indices the loss is taken on (paper App. G.2): every step of the last ``late_fraction``
    of the trajectory (at least one) plus ``num_early`` steps drawn without replacement from the rest."""
    num_late = max(1, math.ceil(late_fraction * num_steps))
    late = list(range(num_steps - num_late, num_steps))
    early_pool = num_steps - num_late
    draw = torch.randperm(early_pool, generator=generator)[: min(num_early, early_pool)].tolist() if early_pool else []
    return sorted(draw) + late


# ------------------------------------------------------------------ the method


@dataclass
class AdjointMatchingConfig:
    reward_multiplier: float = field(
        1.0, help="lambda: the target is p_base(x) exp(lambda r(x)); larger is greedier (scale it to the reward's range)")
    noise_schedule: Literal["memoryless", "constant"] = field(
        "memoryless", help="memoryless (the method) or constant (sigma = constant_noise; biased, for comparison)")
    constant_noise: float = field(1.0, help="sigma of the constant schedule")
    time_offset: float = field(1.0, help="memoryless sigma(t)^2 = 2 (1 - t + o h) / (t + o h), o = this (paper: 1)")
    final_step: Literal["sde", "ode"] = field("sde", help="sde: noise on the last step too (paper); ode: none")
    num_early_steps: int = field(10, help="steps drawn at random from the early part of the trajectory (paper: 10)")
    late_fraction: float = field(0.25, help="fraction of the last steps always in the loss (paper: the last quarter)")
    loss_clip: float = field(
        0.0, help="clip each sample's per-step loss at loss_clip * lambda^2 (0: off); the paper clips at 1.6 lambda^2 "
                  "on its summed norm, this is on the per-element mean")
    terminal: Literal["final", "clean_estimate"] = field(
        "final", help="where grad r is taken: the final sample, or the model's one-step clean estimate from the "
                      "state before it (no residual noise of the last SDE step in the image the reward sees)")

    def __post_init__(self) -> None:
        if self.noise_schedule == "memoryless" and changed_options(self, ["constant_noise"]):
            raise ConfigError("constant_noise is the sigma of noise_schedule: constant; with memoryless it does nothing")
        check(self.reward_multiplier > 0, f"reward_multiplier must be > 0, got {self.reward_multiplier}")
        check(self.constant_noise > 0, f"constant_noise must be > 0, got {self.constant_noise}")
        check(self.time_offset > 0, f"time_offset must be > 0 (sigma diverges at t = 0), got {self.time_offset}")
        check(self.num_early_steps >= 0, f"num_early_steps must be >= 0, got {self.num_early_steps}")
        check(0 < self.late_fraction <= 1, f"late_fraction must be in (0, 1], got {self.late_fraction}")
        check(self.loss_clip >= 0, f"loss_clip must be >= 0, got {self.loss_clip}")


@dataclass
class AdjointBatch:
    states: Tensor  # (S, B, ...) X_t at the trained steps
    steps: list[int]  # their indices on the grid
    adjoints: Tensor  # (S, B, ...) lean adjoint at those states
    drift_base: Tensor  # (S, B, ...) base drift there
    cond: Conditioning
    metrics: dict[str, Tensor]


@register("adjoint_matching")
class AdjointMatching(LossInParts, BackboneMethod):
    summary = "Adjoint Matching (Domingo-Enrich et al. 2024): reward fine-tuning by regressing the lean adjoint"
    Config = AdjointMatchingConfig

    def __init__(self, config: AdjointMatchingConfig, backbone: Backbone, reward: Reward | Callable[..., Any] | None,
                 sample_config: Any):
        self.config, self.backbone, self.reward, self.sample_config = config, backbone, reward, sample_config
        self.params = backbone.named_trainable_parameters()
        if not self.params:
            raise ConfigError("adjoint_matching trains the backbone: set backbone.finetune to lora or full")
        if reward is None:
            raise ConfigError("adjoint_matching needs a differentiable reward; configure reward.name")
        if not getattr(reward, "differentiable", True):
            raise ConfigError(f"adjoint_matching needs the reward's gradient; {getattr(reward, 'name', reward)} is not "
                              "differentiable (use a policy-gradient or value-based method for it)")
        if sample_config.num_steps < 2:
            raise ConfigError("adjoint_matching samples an SDE: sample.num_steps must be >= 2")
        backbone.keep_reference()  # the frozen starting model (a copy under full fine-tuning)
        self.sde = self._make_sde(sample_config.num_steps)

    @classmethod
    def build(cls, experiment: Any, backbone: Backbone | None, reward: Reward | None) -> AdjointMatching:
        if backbone is None:
            raise ConfigError("adjoint_matching needs a backbone: set backbone.family and backbone.path")
        return cls(experiment.method, backbone, reward, experiment.sample)

    def _make_sde(self, num_steps: int) -> SDE:
        """The schedule's memoryless SDE with the options this config changes from the paper's."""
        c = self.config
        names = changed_options(c, ["noise_schedule", "constant_noise", "time_offset", "final_step"])
        return self.backbone.schedule.memoryless_sde(num_steps, **{name: getattr(c, name) for name in names})

    # ---------------------------------------------------------------- pieces

    def _drift(self, x: Tensor, k: int, cond: Conditioning) -> Tensor:
        output = self.backbone.predict(x, self.sde.timesteps[k], cond, self.sample_config.guidance_scale)
        return self.sde.drift(x, output, k)

    @torch.no_grad()
    def rollout(self, cond: Conditioning, generator: torch.Generator, latents: Tensor | None = None) -> Tensor:
        """Sample the SDE with the current model: states (K+1, B, ...) in fp32."""
        x = (initial_noise(self.backbone, len(cond), generator) if latents is None else latents).float()
        states = [x]
        for k in range(self.sde.num_steps):
            mean = x + self.sde.h[k] * self._drift(x, k, cond)
            std = self.sde.std(k)
            if std > 0:
                mean = mean + std * torch.randn(x.shape, generator=generator).to(x.device)
            x = mean
            states.append(x)
        return torch.stack(states)

    @torch.no_grad()
    def clean_estimate(self, states: Tensor, cond: Conditioning) -> Tensor:
        """The current model's one-step estimate of the clean latents from the last-but-one state:
        x + (1 - t) u for flow backbones, the predicted x_0 for diffusion ones."""
        k = self.sde.num_steps - 1
        x = states[k]
        output = self.backbone.predict(x, self.sde.timesteps[k], cond, self.sample_config.guidance_scale).float()
        return self.backbone.schedule.clean_estimate(x, output, self.sde.timesteps[k])

    def terminal_adjoint(self, final: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(-lambda grad_x r(decode(x)), r) at the given latents (the final sample by default)."""
        assert self.reward is not None
        x = final.detach().requires_grad_(True)
        with torch.enable_grad():
            images = self.backbone.decode(x.to(self.backbone.dtype))
            scores, _ = self.reward(images, prompts)
            (grad,) = torch.autograd.grad(scores.float().sum(), x)
        return -self.config.reward_multiplier * grad.float(), scores.detach().float()

    # ---------------------------------------------------------------- the FineTuner contract

    def collect(self, prompts: list[str], generator: torch.Generator) -> AdjointBatch:
        guidance = self.sample_config.guidance_scale
        cond = self.backbone.encode_prompts(prompts, guidance=guidance != 1.0)
        states = self.rollout(cond, generator)
        target = states[-1] if self.config.terminal == "final" else self.clean_estimate(states, cond)
        terminal, scores = self.terminal_adjoint(target, prompts)
        c = self.config
        steps = [k for k in timestep_subset(self.sde.num_steps, c.num_early_steps, c.late_fraction, generator)
                 if self.sde.sigma[k] > 0]
        if not steps:
            raise ConfigError("no stochastic step to train: raise num_early_steps or use final_step: sde")
        base_drifts: dict[int, Tensor] = {}

        def base_step_mean(x: Tensor, k: int) -> Tensor:
            drift = self._drift(x, k, cond)
            if k in steps:
                base_drifts[k] = drift.detach()
            return x.float() + self.sde.h[k] * drift

        first = steps[0]
        with self.backbone.reference():
            adjoints = lean_adjoint(states, terminal, base_step_mean, first=first + 1)
            with torch.no_grad():
                base_drifts[first] = self._drift(states[first], first, cond)
        metrics = {"reward_mean": scores.mean(), "adjoint_norm_0": adjoints[first + 1].flatten(1).norm(dim=1).mean(),
                   "adjoint_norm_1": terminal.flatten(1).norm(dim=1).mean()}
        # The step from X_k is matched to the adjoint of the state it lands on, X_{k+1}: the exact
        # optimum of the discrete chain (the paper's pairing at the same t is its h -> 0 limit; with
        # 10 steps, pairing a_k instead lands a 1-D Gaussian tilt at 1.17 instead of 1.5).
        return AdjointBatch(states[steps], steps, torch.stack([adjoints[k + 1] for k in steps]),
                            torch.stack([base_drifts[k] for k in steps]), cond.detach(), metrics)

    def _loss_parts(self, batch: AdjointBatch, metrics: dict[str, Tensor]) -> Iterator[Tensor]:
        """The adjoint-matching loss of each trained step (their sum is the loss; LossInParts)."""
        clip = self.config.loss_clip * self.config.reward_multiplier**2 or None
        metrics.update(batch.metrics)
        metrics["steps_trained"] = torch.tensor(float(len(batch.steps)))
        clipped: Tensor | float = 0.0
        for i, k in enumerate(batch.steps):
            with self.backbone.training():
                drift = self._drift(batch.states[i], k, batch.cond)
            per_sample = adjoint_matching_loss(drift, batch.drift_base[i], batch.adjoints[i], self.sde.sigma[k], clip)
            if clip is not None:  # a tensor: no host sync per step
                clipped = clipped + (per_sample >= clip).float().mean().detach() / len(batch.steps)
            yield per_sample.mean()
        if clip is not None:
            metrics["clipped_fraction"] = torch.as_tensor(clipped)
