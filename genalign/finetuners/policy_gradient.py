"""What the policy-gradient fine-tuners share: DDPO (Black et al. 2023, "Training Diffusion Models
with Reinforcement Learning") and Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching
Models via Online RL").

Denoising is a T-step MDP: the state is (x_t, t, prompt), the action the next latent, the policy
the sampler's Gaussian step N(mu_theta(x_t, t), s_t^2) (DDIM with eta > 0 on diffusion models,
the marginal-preserving SDE with a noise level on flow models), the reward r(x_0, prompt) arrives
at the end. Both methods:

1. roll out a group of images per prompt with the stochastic sampler and keep every step's
   log-probability under the sampling policy (``old_log_prob``),
2. turn rewards into advantages per prompt (DDPO: a per-prompt stat tracker over recent epochs;
   Flow-GRPO: the group's mean and std), clipped to [-adv_clip_max, adv_clip_max],
3. take a few optimizer steps on minibatches of that rollout with PPO's clipped surrogate on the
   per-step probability ratio r = p_theta(x_{t-1} | x_t) / p_old(x_{t-1} | x_t) (a tiny clip range,
   1e-4 in both official codes, since log-probs are averaged over the latent's elements), optionally
   plus beta times the closed-form KL between the policy's and the reference's Gaussian steps.

Cadence inside genalign's trainer (one ``collect`` + ``loss`` per micro-step): a ``collect`` that
finds no minibatch left rolls out ``run.batch_size`` prompts x ``samples_per_prompt`` images,
splits them (shuffled) into ``minibatches`` minibatches per inner epoch and serves one per call; the
prompts the trainer hands to the calls served from that buffer are not used (they are a random
draw from a reshuffled list, so skipping them biases nothing). Optimizer steps per rollout =
``minibatches * inner_epochs / run.grad_accum``. The buffer and the stat tracker are part of the
checkpoint (the rollout per process, ``process_state_dict``; the tracker shared, ``state_dict``), so a
resumed run continues exactly, with any number of processes resuming their own rollouts.

Conventions checked against the official code (kvablack/ddpo-pytorch ``scripts/train.py``,
yifan123/flow_grpo ``scripts/train_sd3.py``): classifier-free guidance at sampling and training with
the same scale; per-step losses averaged over the trained steps (their gradient accumulation over
timesteps); only steps with noise (std > 0) have a ratio, so deterministic steps (the last step of a
flow schedule, a DDIM step onto alpha = 1) are never trained. One difference: a minibatch trains the
same subset of steps for all its samples (DDPO draws a subset per sample) when
``timestep_fraction`` < 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from genalign.core import sampling
from genalign.core.config import ConfigError, check, field
from genalign.core.distributed import gather_batch
from genalign.core.rollout import rollout
from genalign.core.types import Backbone, Reward, Trajectory
from genalign.finetuners.common import BackboneMethod, LossInParts, OverlappedScores

# ------------------------------------------------------------------ the objective (pure functions)


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4,
                  adv_clip_max: float = 5.0) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7) on one denoising step, negated into a
    loss to minimise, with the advantages first clipped to [-adv_clip_max, adv_clip_max]:

        r_i    = exp(log_prob_i - old_log_prob_i)
        loss   = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps))

    (DDPO_IS, Black et al. 2023, Sec. 4.3 and ddpo-pytorch's ``train.py``; Flow-GRPO, Liu et al.
    2025, the clipped term of its GRPO objective). Inputs (B,); ``old_log_prob`` is the sampling policy's (no
    gradient). At r = 1 the loss is -mean(A) and its gradient -mean(A * d log_prob); where the
    clipped branch is the larger (r beyond the range in the direction A favours) the sample gives
    no gradient. Returns the loss and (B,) diagnostics: ``ratio``, ``clipped`` (|r - 1| > eps, as
    the official codes log ``clipfrac``) and ``approx_kl`` (0.5 (log r)^2, their estimator of the
    KL to the sampling policy).
    """
    return ppo_clip_from_log_ratio(log_prob.float() - old_log_prob.detach().float(), advantages, clip_range,
                                   adv_clip_max)


def ppo_clip_from_log_ratio(log_ratio: Tensor, advantages: Tensor, clip_range: float = 1e-4,
                            adv_clip_max: float = 5.0) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`ppo_clip_loss` given log r (B,) itself (e.g. GRPO-Guard's normalised one)."""
    advantages = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_ratio.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {"ratio": ratio.detach(), "clipped": ((ratio.detach() - 1).abs() > clip_range).float(),
             "approx_kl": 0.5 * log_ratio.detach() ** 2}
    return loss, stats


def gaussian_step_kl(mean_policy: Tensor, mean_reference: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mu_theta, s^2) || N(mu_ref, s^2)) of one step = ||mu_theta - mu_ref||^2 / (2 s^2), averaged
    over the latent's elements like the log-probs -> (B,). The reference mean carries no gradient.
    Zero when policy and reference agree (the closed form Flow-GRPO, Liu et al. 2025, regularises with)."""
    return sampling.gaussian_kl_equal_std(mean_policy.float(), mean_reference.detach().float(),
                                          torch.as_tensor(std).float())


# ------------------------------------------------------------------ settings shared by both methods


@dataclass
class PolicyGradientConfig:
    """Fields both methods have; each method's Config re-declares those whose defaults differ."""

    samples_per_prompt: int = field(1, help="images per prompt in a rollout (the group; GRPO: G)")
    same_initial_noise: bool = field(
        False, help="a prompt's images start from one shared initial noise (else each its own, as both official codes)")
    clip_range: float = field(1e-4, help="PPO clip range eps on the per-step ratio (both papers: 1e-4)")
    adv_clip_max: float = field(5.0, help="advantages are clipped to [-adv_clip_max, adv_clip_max] (both: 5)")
    timestep_fraction: float = field(
        1.0, help="fraction of the stochastic denoising steps trained per minibatch (DDPO: 1.0)")
    timestep_selection: Literal["random", "first"] = field(
        "random", help="which steps when timestep_fraction < 1: a random subset (DDPO) or the first ones (Flow-GRPO's code)")
    minibatches: int = field(
        4, help="a rollout is split into this many minibatches, one per trainer micro-step; optimizer steps per "
                "rollout = minibatches * inner_epochs / run.grad_accum (DDPO's configs: 4 updates a round)")
    inner_epochs: int = field(1, help="passes over each rollout (both papers: 1)")
    beta: float = field(0.0, help="weight of the closed-form KL to the reference step (DDPO: none, 0)")
    drop_zero_advantage: bool = field(
        False, help="leave out samples whose advantage is 0 (groups whose rewards are all equal), as Flow-GRPO's code")
    sample_batch_size: int = field(0, help="images per sampling call during rollouts (0: the whole rollout at once)")
    prompt_metadata: str | None = field(
        None, help="JSONL of metadata rows with a 'prompt' each (GenEval's format, e.g. Flow-GRPO's "
                   "dataset/geneval/train_metadata.jsonl): its prompts are the training prompts and each image's "
                   "row goes to the reward (the geneval reward needs it)")

    def __post_init__(self) -> None:
        check(self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        check(0 < self.clip_range < 1, f"clip_range must be in (0, 1), got {self.clip_range}")
        check(self.adv_clip_max > 0, f"adv_clip_max must be > 0, got {self.adv_clip_max}")
        check(0 < self.timestep_fraction <= 1, f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        check(self.minibatches >= 1 and self.inner_epochs >= 1,
              f"minibatches and inner_epochs must be >= 1, got {self.minibatches}, {self.inner_epochs}")
        check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        check(self.sample_batch_size >= 0, f"sample_batch_size must be >= 0, got {self.sample_batch_size}")


def read_prompt_metadata(path: str | Path) -> dict[str, dict[str, Any]]:
    """Rows of a JSONL file keyed by their ``prompt`` (the last row wins for a repeated prompt)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt_metadata: file not found: {path}")
    rows: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not JSON: {err}") from err
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}:{number}: each row needs a 'prompt' string")
        rows[row["prompt"]] = row
    if not rows:
        raise ConfigError(f"prompt_metadata: {path} has no rows")
    return rows


def zero_spread_share(prompts: list[str], rewards: Tensor) -> float:
    """The share of prompts whose samples' rewards are all equal (a group with nothing to learn)."""
    groups: dict[str, list[float]] = {}
    for prompt, reward in zip(prompts, rewards.tolist()):
        groups.setdefault(prompt, []).append(reward)
    return sum(len(set(g)) == 1 for g in groups.values()) / max(len(groups), 1)


def trained_steps(stochastic: list[int], fraction: float, selection: str, generator: torch.Generator) -> list[int]:
    """The steps a minibatch trains: ``ceil(fraction * len(stochastic))`` of the stochastic steps,
    the first ones or a random subset (in sampling order)."""
    count = max(1, math.ceil(fraction * len(stochastic) - 1e-9))
    if count >= len(stochastic):
        return list(stochastic)
    if selection == "first":
        return list(stochastic[:count])
    chosen = torch.randperm(len(stochastic), generator=generator)[:count].sort().values
    return [stochastic[i] for i in chosen.tolist()]


# ------------------------------------------------------------------ the method


@dataclass
class PolicyGradientBatch:
    """One minibatch of the current rollout: its rows, the denoising steps trained, the metrics."""

    rows: Tensor  # (B,) row indices into the rollout
    steps: list[int]
    metrics: dict[str, Tensor]


class PolicyGradientMethod(LossInParts, BackboneMethod):
    """Rollouts with per-step log-probs, per-prompt advantages, PPO-clip minibatch updates; a method
    supplies ``advantages`` (its normalisation) and may override ``kl_std`` and ``step_loss``."""

    name: ClassVar[str]
    config: PolicyGradientConfig

    def __init__(self, config: PolicyGradientConfig, backbone: Backbone, reward: Reward | None, sample_config: Any):
        self.config, self.backbone, self.reward, self.sample_config = config, backbone, reward, sample_config
        self.params = backbone.named_trainable_parameters()
        if not self.params:
            raise ConfigError(f"{self.name} trains the backbone: set backbone.finetune to lora or full")
        if reward is None:
            raise ConfigError(f"{self.name} needs a reward (any, differentiable or not); configure reward.name")
        if sample_config.eta <= 0:
            raise ConfigError(f"{self.name} needs stochastic rollouts with log-probs: set sample.eta > 0 "
                              "(SD: DDIM eta 1.0; flow models: the SDE noise level, Flow-GRPO 0.7)")
        if config.beta > 0:  # the KL's reference: the frozen starting model
            backbone.keep_reference()
        if backbone.compiled == "all":
            import warnings

            warnings.warn(f"{self.name}: backbone.compile=all compiles the training pass too, whose graph rounds "
                          "unlike the rollout's even when the old log-probs are recomputed, so PPO's clip range "
                          "clips samples at the first update (docs/training.md, 'Speed'); use "
                          "backbone.compile=sampling (the first update's ratio is then exactly 1)", stacklevel=2)
        self.metadata = read_prompt_metadata(config.prompt_metadata) if config.prompt_metadata else {}
        self.rollout: dict[str, Any] = {}  # the current rollout's tensors and prompts
        self.pending: list[dict[str, Tensor]] = []  # its minibatches still to train: rows, steps

    @classmethod
    def build(cls, experiment: Any, backbone: Backbone | None, reward: Reward | None) -> Any:
        if backbone is None:
            raise ConfigError(f"{cls.name} needs a backbone: set backbone.family and backbone.path")
        return cls(experiment.method, backbone, reward, experiment.sample)  # type: ignore[call-arg]

    def training_data(self) -> list[str] | None:
        """The prompts of ``prompt_metadata`` (each row once) when given, else run.prompts."""
        return list(self.metadata) if self.metadata else None

    # ---------------------------------------------------------------- what a method supplies

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """(B,) advantages of the rollout's rewards (B,), before clipping."""
        raise NotImplementedError

    def kl_std(self, trajectory: Trajectory, step: int, step_std: Tensor) -> Tensor:
        """The standard deviation the KL divides by: the step's own (the true KL between the steps)."""
        return step_std

    def step_loss(self, log_ratio: Tensor, advantages: Tensor, kl: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """One step's loss: the PPO-clip surrogate on log r (B,) plus beta * mean KL when ``kl`` (B,) is given."""
        c = self.config
        loss, stats = ppo_clip_from_log_ratio(log_ratio, advantages, c.clip_range, c.adv_clip_max)
        if kl is not None:
            loss = loss + c.beta * kl.mean()
        return loss, stats

    @property
    def keeps_step_means(self) -> bool:
        """Whether rollouts keep their step means (a method whose ratio needs them: GRPO-Guard)."""
        return False

    def log_ratio(self, trajectory: Trajectory, step: int, rows: Tensor, log_prob: Tensor, old_log_prob: Tensor,
                  mean: Tensor, std: Tensor) -> Tensor:
        """log r (B,) of a trained step: log p_theta - log p_old (a method may normalise it)."""
        return log_prob - old_log_prob.detach()

    def step_weight(self, trajectory: Trajectory, step: int) -> float:
        """The weight of a trained step's loss (1; GRPO-Guard: 1 / the step's length)."""
        return 1.0

    # ---------------------------------------------------------------- rollouts

    @torch.no_grad()
    def _sample(self, prompts: list[str], generator: torch.Generator,
                on_chunk: Any = None) -> tuple[Trajectory, Tensor, list[int]]:
        """``samples_per_prompt`` stochastic trajectories per prompt (consecutive), sampled and decoded
        in chunks of ``sample_batch_size`` images (each passed to ``on_chunk``): the trajectory (means
        and stds are not kept: the loss recomputes them), the images (B, 3, H, W) in [0, 1] and the
        steps that have noise."""
        s = self.sample_config
        r = rollout(self.backbone, prompts, s.num_steps, s.guidance_scale, self.rollout_eta(generator),
                    samples_per_prompt=self.config.samples_per_prompt, shared_noise=self.config.same_initial_noise,
                    generator=generator, chunk_size=self.config.sample_batch_size, sde=s.sde, on_chunk=on_chunk)
        if not r.stochastic_steps:
            raise ConfigError(f"{self.name}: no stochastic step in the rollouts; raise sample.eta")
        empty = torch.zeros(0)
        means = r.trajectory.means if self.keeps_step_means else empty
        if self.keeps_step_means and means.numel() == 0:
            raise ConfigError(f"{self.name}: this rollout's step means were not kept (per-image means are needed)")
        trajectory = replace(r.trajectory, log_probs=r.trajectory.log_probs.float().cpu(), means=means, stds=empty)
        images, stochastic = r.images, r.stochastic_steps
        return trajectory, images, stochastic

    def rollout_eta(self, generator: torch.Generator) -> float | list[float]:
        """The stochasticity of a rollout's steps: ``sample.eta`` at every step (a method may put
        noise on some steps only, e.g. Flow-GRPO's SDE window)."""
        return float(self.sample_config.eta)

    @torch.no_grad()
    def _new_rollout(self, prompts: list[str], generator: torch.Generator) -> None:
        c = self.config
        repeated = [p for p in prompts for _ in range(c.samples_per_prompt)]  # as _sample orders them
        assert self.reward is not None
        metadata = [self._metadata_row(p) for p in repeated] if self.metadata else None
        # a served reward scores each chunk while the next is sampled; the scores are the same
        with OverlappedScores.for_reward(self.reward, repeated, metadata) or nullcontext() as overlapped:
            trajectory, images, stochastic = self._sample(prompts, generator, overlapped)
            if overlapped is not None:
                rewards = overlapped.result()
            else:
                rewards = self.reward(images, repeated, metadata)[0].detach().float().cpu()
        bad = (~torch.isfinite(rewards)).nonzero()
        if len(bad):
            raise ValueError(f"{self.name}: the reward is not finite ({float(rewards[bad[0]])}) for {repeated[bad[0]]!r}")
        # advantages from the whole data-parallel batch (the official codes gather rewards and prompts
        # first), then this process's rows
        all_prompts, all_rewards, mine = gather_batch(repeated, rewards)
        advantages = self.advantages(all_prompts, all_rewards)[mine].float().cpu()
        self.rollout = {"latents": trajectory.latents, "timesteps": trajectory.timesteps,
                        "log_probs": trajectory.log_probs, "advantages": advantages, "rewards": rewards,
                        "prompts": repeated, "cond": trajectory.cond,
                        "eta": [trajectory.eta_at(i) for i in range(trajectory.num_steps)]}
        if self.keeps_step_means:
            self.rollout["means"] = trajectory.means
        rows = torch.arange(len(repeated))
        if c.drop_zero_advantage:
            rows = rows[advantages != 0]
        self.pending = []
        for _ in range(c.inner_epochs):
            order = rows[torch.randperm(len(rows), generator=generator)]
            for part in torch.tensor_split(order, c.minibatches):
                steps = trained_steps(stochastic, c.timestep_fraction, c.timestep_selection, generator)
                self.pending.append({"rows": part, "steps": torch.tensor(steps, dtype=torch.long)})
        if self.recomputes_old_log_probs:
            self._recompute_old_log_probs()
        self._rollout_metrics = {
            "reward_rollout": rewards.mean(), "reward_std": rewards.std(unbiased=False),
            "kept": torch.tensor(len(rows) / max(len(repeated), 1)),
            "first_stochastic_step": torch.tensor(float(stochastic[0])),  # an SDE window's start
            "zero_spread_groups": torch.tensor(zero_spread_share(all_prompts, all_rewards)),
        }

    @property
    def recomputes_old_log_probs(self) -> bool:
        """Whether the rollout's log-probs are recomputed by the training pass before any update:
        when the denoiser is compiled (``backbone.compile``), rollouts (graphs without gradient)
        and training passes (eager, or a graph with gradient) round differently, and with PPO's
        clip range of 1e-4 that alone clips most samples at the first update (docs/training.md,
        "Speed"). Recomputed the way the loss computes them, the first update's ratio is 1 again,
        as in the official codes (verl recomputes a rollout engine's log-probs with the actor for
        the same reason)."""
        return self.backbone.compiled != "none"

    def _recompute_old_log_probs(self) -> None:
        """Each pending minibatch's (rows, trained steps) through :meth:`_step` as the loss calls it
        (training mode, gradient on, the graph dropped), written over the rollout's log-probs (and
        step means, where the ratio reads them): the old policy is the policy of this moment."""
        r = self.rollout
        for minibatch in self.pending:
            rows = minibatch["rows"]
            if len(rows) == 0:
                continue
            trajectory = self._minibatch_trajectory(rows)
            for step in minibatch["steps"].tolist():
                with torch.enable_grad(), self.backbone.training():
                    log_prob, mean, _ = self._step(trajectory, step)
                r["log_probs"][rows, step] = log_prob.detach().to(r["log_probs"].device, r["log_probs"].dtype)
                if "means" in r:
                    means = r["means"]
                    means[step][rows.to(means.device)] = mean.detach().to(means.device, means.dtype)

    def _metadata_row(self, prompt: str) -> dict[str, Any]:
        if prompt not in self.metadata:
            raise ConfigError(f"{self.name}: prompt {prompt!r} has no row in {self.config.prompt_metadata}")
        return self.metadata[prompt]

    def collect(self, prompts: list[str], generator: torch.Generator) -> PolicyGradientBatch:
        fresh = not self.pending
        if fresh:
            self._new_rollout(prompts, generator)
        minibatch = self.pending.pop(0)
        rows = minibatch["rows"]
        metrics: dict[str, Tensor] = {"new_rollout": torch.tensor(float(fresh))}
        rewards = self.rollout["rewards"]
        metrics["reward_mean"] = rewards[rows].mean() if len(rows) else rewards.mean()
        if fresh:
            metrics.update(self._rollout_metrics)
        return PolicyGradientBatch(rows, minibatch["steps"].tolist(), metrics)

    # ---------------------------------------------------------------- loss

    def _minibatch_trajectory(self, rows: Tensor) -> Trajectory:
        r = self.rollout
        device_rows = rows.to(r["latents"].device)
        empty = torch.zeros(0)
        eta = r.get("eta", self.sample_config.eta)  # older checkpoints' rollouts had one eta
        return Trajectory(r["latents"][:, device_rows], r["timesteps"], r["log_probs"][rows], empty, empty,
                          r["cond"].select(rows), eta, self.sample_config.guidance_scale, self.sample_config.sde)

    def _step(self, trajectory: Trajectory, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """(log-prob (B,), mean, std) of the stored transition ``step`` under the current model."""
        x, t = trajectory.latents[step], trajectory.timesteps[step]
        output = self.backbone.predict(x, t, trajectory.cond, trajectory.guidance_scale)
        result = self.backbone.schedule.step(x, output, t, trajectory.num_steps, trajectory.eta_at(step),
                                             prev_sample=trajectory.latents[step + 1], sde=trajectory.sde)
        return result.log_prob.float(), result.mean.float(), result.std.float()

    def _loss_parts(self, batch: PolicyGradientBatch, metrics: dict[str, Tensor]) -> Iterator[Tensor]:
        """The per-step losses, each divided by the number of trained steps (LossInParts)."""
        rows, steps = batch.rows, batch.steps
        metrics.update(batch.metrics)
        if len(rows) == 0 or not steps:
            yield self.zero_loss()
            return
        trajectory = self._minibatch_trajectory(rows)
        advantages = self.rollout["advantages"][rows].to(self.backbone.device)
        old_log_probs = trajectory.log_probs.to(self.backbone.device)
        logged: dict[str, list[Tensor]] = {"ratio": [], "ratio_std": [], "clipfrac": [], "approx_kl": [], "kl": []}
        for step in steps:
            reference_mean = None
            if self.config.beta > 0:
                with torch.no_grad(), self.backbone.reference():
                    reference_mean = self._step(trajectory, step)[1]
            with self.backbone.training():
                log_prob, mean, std = self._step(trajectory, step)
            kl = None
            if reference_mean is not None:
                kl = gaussian_step_kl(mean, reference_mean, self.kl_std(trajectory, step, std))
                logged["kl"].append(kl.detach().mean())
            log_ratio = self.log_ratio(trajectory, step, rows, log_prob, old_log_probs[:, step], mean, std)
            loss, stats = self.step_loss(log_ratio, advantages, kl)
            logged["ratio"].append(stats["ratio"].mean())
            logged["ratio_std"].append(stats["ratio"].std(unbiased=False))  # the spread within a step
            logged["clipfrac"].append(stats["clipped"].mean())
            logged["approx_kl"].append(stats["approx_kl"].mean())
            yield loss * self.step_weight(trajectory, step) / len(steps)
        metrics.update({name: torch.stack(values).mean() for name, values in logged.items() if values})
        step_means = torch.stack(logged["ratio"])  # the ratio's mean per trained step: its lowest and highest
        metrics.update({"ratio_step_min": step_means.min(), "ratio_step_max": step_means.max()})
        metrics.update({"advantage_abs": advantages.abs().mean(), "steps_trained": torch.tensor(float(len(steps))),
                        "samples_trained": torch.tensor(float(len(rows)))})

    # ---------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """What every process shares (a method's statistics); the rollout is per process."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rollout" in state:  # a checkpoint from before the per-process split
            self.load_process_state_dict(state)

    def process_state_dict(self) -> dict[str, Any]:
        """This process's unfinished rollout (tensors and prompts; the conditioning is re-encoded on
        load) and the minibatches left of it."""
        rollout = {k: (v.detach().cpu() if isinstance(v, Tensor) else list(v))
                   for k, v in self.rollout.items() if k != "cond"}
        return {"rollout": rollout, "pending": [{k: v.clone() for k, v in m.items()} for m in self.pending]}

    def load_process_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = [dict(m) for m in state["pending"]]
        rollout = dict(state["rollout"])
        if rollout:
            s = self.sample_config
            rollout["latents"] = rollout["latents"].to(self.backbone.device, self.backbone.dtype)
            rollout["cond"] = self.backbone.encode_prompts(rollout["prompts"], guidance=s.guidance_scale != 1.0)
        self.rollout = rollout
