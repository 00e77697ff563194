"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"): GRPO on a
flow-matching model whose deterministic sampler is turned into a marginal-preserving SDE, for any
reward (GenEval's rules, OCR, PickScore, the shapes world's exact evaluator).

ODE -> SDE (the paper's conversion, Euler-Maruyama discretised; ``genalign.core.sampling.flow_sde_step``):
in diffusers' sigma (1 = noise), with noise level a (``sample.eta``, paper 0.7) and
s_t = a sqrt(sigma / (1 - sigma)),

    x_{t+dt} = x_t + [v_theta(x_t) + s_t^2 / (2 sigma) (x_t + (1 - sigma) v_theta(x_t))] dt + s_t sqrt(-dt) eps

a Gaussian step whose log-density is the policy's. A group of G images per prompt (``samples_per_prompt``,
paper 24) is scored; advantages are group-normalised (:func:`group_advantages`: GRPO's group mean over
the whole batch's std, as the official ``global_std``, or over the group's own). Loss per trained step
(the paper's GRPO objective with its KL term, negated; :func:`flow_grpo_loss`):

    loss = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps)) + beta * mean_i KL_i,
    KL_i = ||mu_theta(x_t) - mu_ref(x_t)||^2 / (2 s_t^2 |dt|)

the closed-form KL between the policy's and the reference's Gaussian steps, as the paper writes it
(``kl_variance: step``). The official code (yifan123/flow_grpo ``scripts/train_sd3.py`` with
``sd3_sde_with_logprob``, which returns s_t, not the step's std) divides by 2 s_t^2 without |dt|, a
KL |dt| times smaller (|dt| is 0.04-0.25 on SD3's 10-step schedule at shift 3); the default
``kl_variance: sigma`` reproduces it, so the reported beta values (GenEval 0.04, PickScore 0.01) act
as they do there. ``sigma`` needs a flow backbone (s_t is the flow SDE's).

Denoising Reduction: rollouts use ``sample.num_steps`` (paper: 10) while evaluation keeps
the model's usual count with the ODE (paper: 40; here ``eval_num_steps`` for the sample grids; pass
``--steps`` to ``genalign eval``). The official code trains the first ``int(0.99 * 10) = 9`` steps, i.e.
every step but the last; genalign's flow sampler already makes the step into sigma = 0 deterministic
(no ratio there), so ``timestep_fraction: 1.0`` trains the same nine. Other defaults from its
``config/grpo.py``: clip range 1e-4, advantages clipped to [-5, 5], two gradient updates per sampling
round, one inner epoch, groups whose rewards are all equal left out, guidance 4.5 at rollouts and in
training, LoRA, lr 3e-4, EMA of the weights (``run.ema``). One difference: the official training
pass detaches the unconditional branch of classifier-free guidance; the Backbone contract guides in
one call, so here gradients reach both branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from genalign.core.config import ConfigError, check, field
from genalign.core.types import Backbone, Reward, Trajectory
from genalign.finetuners import register
from genalign.finetuners.common import sample_images
from genalign.finetuners.policy_gradient import (
    PolicyGradientConfig,
    PolicyGradientMethod,
    gaussian_step_kl,
    ppo_clip_loss,
)

# ------------------------------------------------------------------ the objective (pure functions)


def group_advantages(rewards: Tensor, prompts: list[str], global_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage as Flow-GRPO computes it: A_i = (r_i - mean(group)) / (std + eps), the
    group being the samples of the same prompt in this batch, ``std`` the whole batch's (``global_std``,
    the official default) or the group's (population std, as numpy's). A group whose rewards are all
    equal gets exactly 0 (nothing to learn from it). rewards (B,) -> (B,)."""
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {rewards.shape[0]} rewards")
    values = rewards.detach().double().cpu()
    advantages = torch.zeros_like(values)
    batch_std = values.std(unbiased=False)
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        group = values[index]
        if bool((group == group[0]).all()):
            continue
        std = batch_std if global_std else group.std(unbiased=False)
        advantages[index] = (group - group.mean()) / (std + eps)
    return advantages.float().to(rewards.device)


def flow_grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mean_policy: Tensor | None = None,
                   mean_reference: Tensor | None = None, kl_std: Tensor | float = 1.0, clip_range: float = 1e-4,
                   adv_clip_max: float = 5.0, beta: float = 0.04) -> Tensor:
    """Flow-GRPO's loss for one denoising step (Liu et al. 2025, the GRPO objective with its KL term,
    negated into a loss; yifan123/flow_grpo ``scripts/train_sd3.py``):

        mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps)) + beta * mean_i ||mu_theta - mu_ref||^2 / (2 kl_std^2)

    with r = exp(log_prob - old_log_prob) and A clipped to [-adv_clip_max, adv_clip_max]; log-probs
    and advantages (B,), step means (B, ...) (the KL term is averaged over their elements and left
    out when no means are given), ``kl_std`` the step's standard deviation (the true KL) or s_t (the
    official code's). At r = 1 and mu_theta = mu_ref: -mean(A)."""
    loss, _ = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    if mean_policy is None or mean_reference is None or beta == 0:
        return loss
    return loss + beta * gaussian_step_kl(mean_policy, mean_reference, kl_std).mean()


# ------------------------------------------------------------------ the method


@dataclass
class FlowGRPOConfig(PolicyGradientConfig):
    samples_per_prompt: int = field(24, help="group size G: images per prompt in a rollout (paper: 24)")
    timestep_selection: Literal["random", "first"] = field(
        "first", help="which steps when timestep_fraction < 1: the first ones (Flow-GRPO's code) or a random subset")
    minibatches: int = field(
        2, help="a rollout is split into this many minibatches, one per trainer micro-step; optimizer steps per "
                "rollout = minibatches * inner_epochs / run.grad_accum (Flow-GRPO: 2 updates a round)")
    beta: float = field(0.04, help="KL weight (paper, GenEval: 0.04; PickScore: 0.01; 0 disables the reference pass)")
    drop_zero_advantage: bool = field(
        True, help="leave out samples whose advantage is 0 (groups whose rewards are all equal), as Flow-GRPO's code")
    global_std: bool = field(True, help="divide by the whole batch's reward std (official default) instead of the group's")
    kl_variance: Literal["step", "sigma"] = field(
        "sigma", help="KL denominator: sigma = 2 s_t^2 (the official code's; its beta values assume it); step = "
                      "2 s_t^2 |dt| (the KL between the Gaussian steps as the paper writes it, 1/|dt| times larger)")
    eval_num_steps: int = field(40, help="ODE steps of the sample grids (Denoising Reduction: rollouts use sample.num_steps)")
    sde_window: int = field(
        0, help="SDE window (Flow-GRPO-Fast, MixGRPO): only this many consecutive steps have noise and are trained, "
                "the others are ODE steps (0: every step; Flow-GRPO-Fast SD3.5: 3)")
    sde_window_range: list[int] = field(
        default_factory=lambda: [0, 0],
        help="[lo, hi]: the window lies within steps lo .. hi - 1 (hi 0: sample.num_steps - 1; Flow-GRPO-Fast: [0, 5])")
    sde_window_strategy: Literal["random", "progressive"] = field(
        "random", help="random: a start drawn per rollout (Flow-GRPO-Fast); progressive: the start moves one step "
                       "every sde_window_shift_every rollouts, the window shrinking at the range's end, then rolls "
                       "back to the range's start (MixGRPO's sliding window)")
    sde_window_shift_every: int = field(25, help="progressive: rollouts per window position (MixGRPO: 25)")
    ratio_norm: bool = field(
        False, help="GRPO-Guard: normalise each step's log-ratio (its mean 0 and its scale the same at every step) "
                    "and weight each step's loss by 1 / its length; the official configs then clip at 2e-6 - 4e-6")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.eval_num_steps >= 1, f"eval_num_steps must be >= 1, got {self.eval_num_steps}")
        check(self.sde_window >= 0, f"sde_window must be >= 0, got {self.sde_window}")
        check(len(self.sde_window_range) == 2 and 0 <= self.sde_window_range[0]
              and (self.sde_window_range[1] == 0 or self.sde_window_range[1] > self.sde_window_range[0]),
              f"sde_window_range must be [lo, hi] with 0 <= lo < hi (hi 0: the last step), got {self.sde_window_range}")
        check(self.sde_window_shift_every >= 1, f"sde_window_shift_every must be >= 1, got {self.sde_window_shift_every}")


def ratio_norm_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's RatioNorm (flow_grpo ``scripts/train_sd3_GRPO_Guard.py``, with the per-sample mean
    over latent dims its author confirmed in flow_grpo issue #244): with s the step's std (its batch
    mean) and log p averaged over latent dims,

        log r = s (log p_theta - log p_old + mean_d (mu_theta - mu_old)^2 / (2 s^2))

    which for x' = mu_old + s eps is mean_d(eps (mu_theta - mu_old)): zero-mean over the noise and of
    the same scale at every step, where the plain log-ratio's mean is below 0 (its ratio's mean below
    1, the implicit over-optimisation the paper names). (B,) from (B,) log-probs and (B, ...) means."""
    s = std.float().mean()
    delta_sq = (mean.float() - old_mean.float()).pow(2).mean(dim=tuple(range(1, mean.ndim)))
    return s * (log_prob.float() - old_log_prob.float() + delta_sq / (2 * s**2))


def sde_window(num_steps: int, size: int, lo: int, hi: int, strategy: str, rollout_index: int, shift_every: int,
               generator: torch.Generator) -> tuple[int, int]:
    """The SDE window of a rollout, steps ``start .. end - 1``, within lo .. hi - 1 (hi 0: num_steps - 1,
    the step into sigma = 0 being deterministic anyway).

    random (Flow-GRPO-Fast): start uniform in lo .. hi - size (drawn from ``generator``), the window whole.
    progressive (MixGRPO's sliding window with ``prog_overlap_step`` 1 and ``roll_back``): start =
    lo + (rollout_index // shift_every) mod (hi - lo), end = min(start + size, hi), so the last
    positions' windows shrink to the range's end before the window rolls back to lo."""
    hi = hi or num_steps - 1
    if hi - size - lo + 1 < 1:
        raise ConfigError(f"flow_grpo: an SDE window of {size} steps does not fit in steps {lo} .. {hi - 1}")
    if strategy == "random":
        start = lo + int(torch.randint(hi - size - lo + 1, (1,), generator=generator))
        return start, start + size
    start = lo + (rollout_index // shift_every) % (hi - lo)
    return start, min(start + size, hi)


@register("flow_grpo")
class FlowGRPO(PolicyGradientMethod):
    summary = "Flow-GRPO (Liu et al. 2025): GRPO on a flow model's SDE rollouts, group advantages, KL to the reference"
    Config = FlowGRPOConfig
    name = "flow_grpo"
    config: FlowGRPOConfig

    def __init__(self, config: FlowGRPOConfig, backbone: Backbone, reward: Reward | None, sample_config: Any):
        super().__init__(config, backbone, reward, sample_config)
        if config.kl_variance == "sigma" and config.beta > 0 and backbone.parameterisation != "flow":
            raise ConfigError("flow_grpo: kl_variance=sigma (the default, the official code's KL) divides by the flow "
                              "SDE's s_t; on a diffusion backbone set method.kl_variance: step")
        if sample_config.sde != "default" and config.kl_variance == "sigma" and config.beta > 0:
            raise ConfigError("flow_grpo: kl_variance=sigma scales the KL by the plain flow SDE's s_t; with sample.sde: "
                              "cps set method.kl_variance: step (the KL between the CPS steps) or beta 0 (as the "
                              "official fast configs)")
        if config.ratio_norm and sample_config.sde == "cps":
            raise ConfigError("flow_grpo: ratio_norm (GRPO-Guard) corrects a Gaussian log-ratio by (mu - mu_old)^2 / (2 s^2); "
                              "CPS's surrogate log-prob has no 1 / (2 s^2): use sample.sde: cps_gaussian with it")
        self.rollouts_done = 0  # the progressive SDE window's clock
        self.window_start = -1
        if config.sde_window and config.sde_window > sample_config.num_steps - 1:
            raise ConfigError(f"flow_grpo: sde_window {config.sde_window} is longer than the {sample_config.num_steps - 1} "
                              "steps that can have noise")
        if config.samples_per_prompt < 2:
            raise ConfigError("flow_grpo normalises within each prompt's group: set method.samples_per_prompt >= 2")

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        return group_advantages(rewards, prompts, self.config.global_std)

    @property
    def keeps_step_means(self) -> bool:
        return self.config.ratio_norm

    def log_ratio(self, trajectory: Trajectory, step: int, rows: Tensor, log_prob: Tensor, old_log_prob: Tensor,
                  mean: Tensor, std: Tensor) -> Tensor:
        if not self.config.ratio_norm:
            return super().log_ratio(trajectory, step, rows, log_prob, old_log_prob, mean, std)
        old_mean = self.rollout["means"][step][rows.to(self.rollout["means"].device)].to(mean.device)
        return ratio_norm_log_ratio(log_prob, old_log_prob, mean, old_mean, std)

    def step_weight(self, trajectory: Trajectory, step: int) -> float:
        """GRPO-Guard's gradient reweighting: a step's loss over its length in paper time."""
        if not self.config.ratio_norm:
            return 1.0
        return 1.0 / float(self.backbone.schedule.step_length(trajectory.timesteps[step], trajectory.num_steps))

    def rollout_eta(self, generator: torch.Generator) -> float | list[float]:
        """With an SDE window: ``sample.eta`` on the window's steps, 0 (the ODE) elsewhere."""
        c, s = self.config, self.sample_config
        if not c.sde_window:
            return super().rollout_eta(generator)
        start, end = sde_window(s.num_steps, c.sde_window, c.sde_window_range[0], c.sde_window_range[1],
                                c.sde_window_strategy, self.rollouts_done, c.sde_window_shift_every, generator)
        self.rollouts_done += 1
        self.window_start = start
        return [float(s.eta) if start <= i < end else 0.0 for i in range(s.num_steps)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rollouts_done": self.rollouts_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rollouts_done = int(state.get("rollouts_done", 0))

    def kl_std(self, trajectory: Trajectory, step: int, step_std: Tensor) -> Tensor:
        if self.config.kl_variance == "step":
            return step_std
        # s_t = step std / sqrt(|dt|), dt in sigma units (the step's length in paper time)
        dt = self.backbone.schedule.step_length(trajectory.timesteps[step], trajectory.num_steps)
        return step_std / dt.sqrt().float().to(step_std.device)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator) -> Tensor:
        """Sample grids with the ODE at ``eval_num_steps`` (Denoising Reduction's evaluation)."""
        return sample_images(self.backbone, prompts, generator, self.config.eval_num_steps,
                             self.sample_config.guidance_scale)
