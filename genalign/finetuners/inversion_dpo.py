"""Inversion-DPO (Li et al. 2025, "Inversion-DPO: Precise and Efficient Post-Training for Diffusion
Models"): instead of noising winner and loser at a random t, invert both deterministically with
the reference model (DDIM / flow ODE inversion) and train on the inversion's states, with the
reference's predictions along the inversion as targets.

Per image, the policy's deviation along its inversion is

    D = sum_i w_i * mean((pred_theta(x_i, t_i) - pred_ref(x_i, t_i))^2) / T

and the loss is ``-log sigmoid(-beta/2 * (D_w - D_l))``.

Sign: on the inversion path x_{i-1} is the reference's step mean, so the per-step log-ratio
log p_theta / p_ref is about -c_i * ||pred_theta - pred_ref||^2: the implicit reward is -beta * D,
and DPO's -log sigmoid(r_w - r_l) gives the sign above -- Diffusion-DPO's loss with the reference
prediction as target (its ref terms vanish). We test that a training step makes the policy
reconstruct the winner better relative to the loser (tests/test_dpo.py).

Targets: the reference inverts with classifier-free guidance (``inversion_guidance``, 2.0 as in
the official code) while the policy is evaluated conditionally (``policy_guidance`` 1). Were the
two equal, a fresh LoRA would start at D = 0, a stationary point with zero gradient.

What the official code does (MIGHTYEZ/Inversion-DPO ``train_ddim.py``), and ``objective: official``
reproduces: ``inside_term = 0.5 * diff * beta_dpo`` with diff = D_w - D_l, i.e. the opposite sign,
``-log sigmoid(+beta/2 * (D_w - D_l))`` (it pushes the policy's deviation up on the winner and down
on the loser), and the policy evaluated at the reference's guidance (2). Both together start at
that stationary point: from a zero-initialised LoRA in full precision the gradient is exactly 0
and training never moves (tested); the official script trains the full UNet with the reference
in fp16 and the policy in fp32, whose rounding difference is what makes D non-zero there.
``objective: derived`` (the default) is the sign of the derivation with the policy at
``policy_guidance``; docs/methods.md has the comparison on the shapes world.
Step weights ``alpha``: w_i = 1 / (2 * alphabar_{t_i}) (the official code's
(1 - a) / (2 (1 - a) a)); ``uniform``: 1 (the only choice for flow backbones).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from genalign.core.config import check, field
from genalign.core.sampler import Inversion, invert_trajectory
from genalign.core.types import Backbone, Reward
from genalign.finetuners import register
from genalign.finetuners.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig, concat_conditioning, positive_fraction
from genalign.finetuners.preference_data import PairBatch


def inversion_dpo_loss(deviation_w: Tensor, deviation_l: Tensor, beta: float, sign: float = -1.0) -> Tensor:
    """Batch mean of ``-log sigmoid(sign * beta/2 * (D_w - D_l))`` for the policy's deviations (B,) from
    the reference along the winner's and the loser's inversions: sign -1 is the derivation's (the
    winner's deviation is pushed down), +1 the official code's ``inside_term = 0.5 * diff * beta_dpo``.
    D_w = D_l gives log 2."""
    if sign not in (-1.0, 1.0):
        raise ValueError(f"sign must be -1 or +1, got {sign}")
    return -F.logsigmoid(sign * 0.5 * beta * (deviation_w - deviation_l)).mean()


def inversion_deviation(policy: Tensor, reference: Tensor, weights: Tensor) -> Tensor:
    """D (B,) from predictions (S, B, ...) along S inversion steps and step weights (S,):
    ``sum_i w_i * mean((policy_i - reference_i)^2) / S``."""
    per_step = (policy.float() - reference.float()).pow(2).mean(dim=tuple(range(2, policy.ndim)))  # (S, B)
    return (weights.view(-1, 1) * per_step).sum(0) / policy.shape[0]


@dataclass
class InversionDPOConfig(DiffusionDPOConfig):
    beta: float = field(5000.0, help="KL strength (official default 5000; its SDXL launcher uses 2000)")
    inversion_steps: int = field(40, help="DDIM / flow ODE inversion steps (official: 40; SDXL launcher: 80)")
    inversion_guidance: float = field(2.0, help="guidance of the reference during inversion (official: 2)")
    policy_guidance: float = field(
        1.0, help="objective derived: guidance of the policy on the inversion states (1: conditional)")
    objective: Literal["derived", "official"] = field(
        "derived", help="derived: -log sigmoid(-beta/2 (D_w - D_l)), policy at policy_guidance; official: "
                        "MIGHTYEZ/Inversion-DPO's train_ddim.py, the opposite sign and the policy at inversion_guidance "
                        "(from a fresh LoRA in fp32 its gradient is exactly 0)")
    steps_per_update: int = field(0, help="train on this many random inversion steps per pair (0: all)")
    step_weighting: Literal["auto", "alpha", "uniform"] = field(
        "auto", help="alpha: 1/(2 alphabar_t) (official); uniform: 1; auto: alpha for diffusion, uniform for flow")
    cache_size: int = field(1024, help="inversions kept (CPU) per reference model, keyed by offline row")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.inversion_steps >= 1, f"inversion_steps must be >= 1, got {self.inversion_steps}")
        check(self.steps_per_update >= 0, f"steps_per_update must be >= 0, got {self.steps_per_update}")
        check(self.cache_size >= 0, f"cache_size must be >= 0, got {self.cache_size}")
        check(self.proportion_empty_prompts == 0,
              "proportion_empty_prompts does nothing in inversion_dpo (the official code drops no captions); remove it")
        check(self.timestep_weighting == "none",
              "timestep_weighting does nothing in inversion_dpo (its steps are weighted by step_weighting); remove it")
        check(self.objective == "derived" or self.policy_guidance == 1.0,
              "objective: official evaluates the policy at inversion_guidance, so policy_guidance does nothing; remove it")


@dataclass
class InversionBatch:
    """Preference pairs with their inversions (None when every pair was a tie) and the inversion
    steps trained."""

    pairs: PairBatch
    inversion_w: Inversion | None = None
    inversion_l: Inversion | None = None
    steps: Tensor | None = None


@register("inversion_dpo")
class InversionDPO(DiffusionDPO):
    summary = "Inversion-DPO (Li et al. 2025): Diffusion-DPO on DDIM-inverted latents of winner and loser"
    Config = InversionDPOConfig
    config: InversionDPOConfig

    def __init__(self, config: InversionDPOConfig, backbone: Backbone, reward: Reward | None, sample_config: Any):
        super().__init__(config, backbone, reward, sample_config)
        self.cache: OrderedDict[tuple[int, int], tuple[Inversion, Inversion]] = OrderedDict()
        self.reference_version = 0  # bumped whenever a stable reference moves: cached inversions expire
        self.buffer_inversions: tuple[PairBatch, tuple[Inversion, Inversion]] | None = None
        weighting = config.step_weighting
        has_alpha = backbone.schedule.alpha_prod(torch.zeros(1, dtype=torch.long)) is not None
        if weighting == "auto":
            weighting = "alpha" if has_alpha else "uniform"
        if weighting == "alpha" and not has_alpha:
            raise ValueError("step_weighting alpha needs a diffusion (alphabar) schedule; use uniform for flow")
        self.weighting = weighting

    def step_weights(self, timesteps: Tensor) -> Tensor:
        if self.weighting == "uniform":
            return torch.ones(timesteps.shape[0], device=self.backbone.device)
        alpha_prod = self.backbone.schedule.alpha_prod(timesteps)
        assert alpha_prod is not None  # checked when the method was built
        return (1.0 / (2.0 * alpha_prod.float())).to(self.backbone.device)

    def _invert(self, latents: Tensor, cond: Any) -> Inversion:
        with torch.no_grad(), self.reference():
            return invert_trajectory(self.backbone, latents, cond, self.config.inversion_steps,
                                     self.config.inversion_guidance)

    def inversions(self, pairs: PairBatch, rows: list[int] | None) -> tuple[Inversion, Inversion]:
        """Winner and loser inversions of a batch; offline rows seen before come from the cache and
        the others are inverted together in one batch."""
        guidance = self.config.inversion_guidance != 1.0
        if rows is None or self.config.cache_size == 0:
            guided = self.backbone.encode_prompts(pairs.prompts, guidance=guidance)
            return self._invert(pairs.x0_w, guided), self._invert(pairs.x0_l, guided)
        missing = [i for i, row in enumerate(rows) if (row, self.reference_version) not in self.cache]
        fresh: dict[int, tuple[Inversion, Inversion]] = {}
        if missing:
            guided = self.backbone.encode_prompts([pairs.prompts[i] for i in missing], guidance=guidance)
            inverted = [_to(self._invert(x0[missing], guided), "cpu") for x0 in (pairs.x0_w, pairs.x0_l)]
            fresh = {i: (_row(inverted[0], n), _row(inverted[1], n)) for n, i in enumerate(missing)}
        per_row = []
        for i, row in enumerate(rows):
            key = (row, self.reference_version)
            if i in fresh:
                self.cache[key] = fresh[i]
            per_row.append(self.cache[key])
        while len(self.cache) > self.config.cache_size:
            self.cache.popitem(last=False)
        device = self.backbone.device
        return tuple(_to(_stack([r[k] for r in per_row]), device) for k in (0, 1))  # type: ignore[return-value]

    def collect(self, prompts: list[str], generator: torch.Generator) -> InversionBatch:  # type: ignore[override]
        pairs = self.pairs(prompts, generator)
        rows = [int(row) for row in prompts] if self.data is not None else None
        if len(pairs) == 0:
            return InversionBatch(pairs)
        if rows is None and self.buffer_inversions is not None and self.buffer_inversions[0] is pairs:
            inversion_w, inversion_l = self.buffer_inversions[1]  # reused online pairs: inverted once
        else:
            inversion_w, inversion_l = self.inversions(pairs, rows)
            if rows is None:
                self.buffer_inversions = (pairs, (inversion_w, inversion_l))
        steps = torch.arange(self.config.inversion_steps)
        if self.config.steps_per_update:
            steps = torch.randperm(self.config.inversion_steps, generator=generator)[: self.config.steps_per_update]
        return InversionBatch(pairs, inversion_w, inversion_l, steps.sort().values)

    @property
    def policy_guidance(self) -> float:
        c = self.config
        return c.inversion_guidance if c.objective == "official" else c.policy_guidance

    def deviations(self, pairs: PairBatch, inversion_w: Inversion, inversion_l: Inversion, steps: Tensor) -> Tensor:
        """(2N,) policy deviations D along the chosen inversion steps, winners first."""
        guidance = self.policy_guidance
        if guidance == 1.0:
            cond = concat_conditioning(pairs.cond)  # the pairs' (unguided) conditioning, winners then losers
        else:  # the guidance branch is needed: encode with the negative prompt
            cond = self.backbone.encode_prompts(pairs.prompts + pairs.prompts, guidance=True)
        predictions, references = [], []
        with self.backbone.training():
            for i in steps.tolist():
                x = torch.cat([inversion_w.inputs[i], inversion_l.inputs[i]])
                t = inversion_w.timesteps[i]
                predictions.append(self.backbone.predict(x, t, cond, guidance))
                references.append(torch.cat([inversion_w.predictions[i], inversion_l.predictions[i]]))
        weights = self.step_weights(inversion_w.timesteps[steps])
        return inversion_deviation(torch.stack(predictions), torch.stack(references), weights)

    def loss(self, batch: InversionBatch) -> tuple[Tensor, dict[str, Tensor]]:  # type: ignore[override]
        pairs = batch.pairs
        if len(pairs) == 0 or batch.inversion_w is None or batch.inversion_l is None or batch.steps is None:
            return self.zero_loss(), dict(pairs.metrics)
        deviation = self.deviations(pairs, batch.inversion_w, batch.inversion_l, batch.steps)
        deviation_w, deviation_l = deviation.chunk(2)
        sign = 1.0 if self.config.objective == "official" else -1.0
        loss = inversion_dpo_loss(deviation_w, deviation_l, self.config.beta, sign)
        margin = sign * (deviation_w - deviation_l).detach()
        metrics = {
            **pairs.metrics,
            "implicit_accuracy": positive_fraction(margin),
            "deviation_w": deviation_w.detach().mean(), "deviation_l": deviation_l.detach().mean(),
        }
        return loss, metrics

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self.stable_reference is not None:
            self.reference_version += 1
            self.buffer_inversions = None


def _to(inversion: Inversion, device: Any) -> Inversion:
    return Inversion(*(t.to(device) for t in (inversion.states, inversion.inputs, inversion.timesteps,
                                               inversion.predictions)))


def _row(inversion: Inversion, n: int) -> Inversion:
    """Sample ``n`` of a batched inversion, as a batch of one."""
    return Inversion(inversion.states[:, n : n + 1], inversion.inputs[:, n : n + 1], inversion.timesteps,
                     inversion.predictions[:, n : n + 1])


def _stack(inversions: list[Inversion]) -> Inversion:
    """Batch single-image inversions along the batch dimension (timesteps are shared)."""
    return Inversion(torch.cat([i.states for i in inversions], 1), torch.cat([i.inputs for i in inversions], 1),
                     inversions[0].timesteps, torch.cat([i.predictions for i in inversions], 1))
