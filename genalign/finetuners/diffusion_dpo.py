"""Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", Eq. 14): preference pairs (winner w, loser l) noised with the same t and noise;
the policy is pushed to lower its denoising error on w relative to l, measured against a frozen
reference.

    loss = -log sigmoid(-beta/2 * ((err_w - err_l) - (ref_err_w - ref_err_l)))

with err the per-sample mean squared error of the prediction against the backbone's training
target (epsilon, v or flow velocity: whatever the backbone predicts). Convention and default
beta = 5000 are the official repository's (SalesforceAIResearch/DiffusionDPO, train.py:
``scale_term = -0.5 * beta_dpo``). The diffusers research script writes the same loss as
``-logsigmoid(beta * (ref_diff - model_diff))`` with default 2500: its beta is half of this one
(beta_diffusers = beta / 2), the effective coefficient is the same.

Options from "Rethinking Direct Preference Optimization in Diffusion Models" (Kang et al. 2025),
off by default. Its code and exact constants could not be checked here, so these are the two
mechanisms as its abstract describes them, in a form stated below:
- stable reference (``reference_update_rate > 0``): after every optimizer step the reference
  moves toward the policy, ref <- ref + rate * (policy - ref), and is regularised toward the
  starting model, ref <- ref - anchor * (ref - ref_0) (``reference_anchor``);
- timestep-aware weighting (``timestep_weighting: relative``): the DPO margin of each pair is
  divided by the reference's error scale at its timestep, (ref_err_w + ref_err_l) / 2, and
  multiplied by the batch mean of that scale, so every timestep contributes on the same scale
  while the average beta is unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from genalign.core.config import ConfigError, check, field
from genalign.core.types import Backbone, Conditioning, Reward
from genalign.finetuners import register
from genalign.finetuners.common import BackboneMethod, ShadowParameters, per_sample_mse
from genalign.finetuners.preference_data import (
    PairBatch,
    load_pick_a_pic,
    offline_pairs,
    online_pairs,
    preference_rows,
)

# ------------------------------------------------------------------ the objective (pure functions)


def dpo_margin(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float) -> Tensor:
    """The implicit reward margin (B,): ``-beta/2 * ((err_w - err_l) - (ref_err_w - ref_err_l))``;
    positive when the policy improved on the winner relative to the loser more than the reference."""
    return -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))


def diffusion_dpo_loss(
    model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float = 5000.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Batch mean of ``-log sigmoid(weights * margin)`` (Diffusion-DPO, Eq. 14); inputs (B,) per-sample
    MSEs of policy and reference on winner and loser noised alike; ``weights`` (B,) scale the margin
    per pair (the timestep-aware option), default 1. Policy == reference gives log 2."""
    margin = dpo_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    if weights is not None:
        margin = margin * weights
    return -F.logsigmoid(margin).mean()


def positive_fraction(margin: Tensor) -> Tensor:
    """Fraction of pairs whose implicit reward margin is positive, ties counting one half (as in
    diffusers' script): the implicit accuracy of any DPO-style margin."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


def implicit_accuracy(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor) -> Tensor:
    """Fraction of pairs whose Diffusion-DPO margin is positive (ties count one half)."""
    return positive_fraction(dpo_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, 1.0))


def timestep_balance_weights(ref_err_w: Tensor, ref_err_l: Tensor, eps: float = 1e-8) -> Tensor:
    """(B,) weights mean(s) / s_i with s_i = (ref_err_w + ref_err_l) / 2 (detached): a pair's margin is
    measured relative to the error scale of its timestep; the batch's mean scale is kept."""
    scale = (0.5 * (ref_err_w + ref_err_l)).detach().clamp_min(eps)
    return scale.mean() / scale


# ------------------------------------------------------------------ the method


@dataclass
class DiffusionDPOConfig:
    beta: float = field(5000.0, help="KL strength (official convention; diffusers' research script uses beta/2). "
                                     "SD1.5/SDXL: 5000; 2000-5000 is the usual range")
    pairs: Literal["online", "offline"] = field(
        "online", help="online: sample images and rank them with the reward; offline: a Pick-a-Pic format dataset")
    dataset: str | None = field(None, help="offline pairs: hub id, save_to_disk folder, or parquet file(s)")
    dataset_split: str = field("train", help="offline pairs: dataset split")
    random_crop: bool = field(False, help="offline pairs: random instead of centre crop")
    vae_latents: Literal["sample", "mean"] = field(
        "sample", help="offline pairs: latents drawn from the VAE posterior (the official scripts' "
                       "latent_dist.sample()) or its mean")
    proportion_empty_prompts: float = field(
        0.0, help="caption dropout: each pair's caption is replaced by the empty prompt with this probability "
                  "during training (the official train.py's default is 0.2)")
    hflip: bool = field(True, help="offline pairs: random horizontal flip (both images of a pair alike)")
    bad_rows: Literal["error", "skip"] = field(
        "error", help="offline pairs: a row with a label outside {0, 0.5, 1} or an image that does not decode "
                      "stops the run (error, naming the row) or is reported and skipped (skip)")
    samples_per_prompt: int = field(2, help="online pairs: images per prompt; the best and worst make the pair")
    sample_batch_size: int = field(0, help="online pairs: images per sampling call (0: all at once; a served "
                                           "reward scores each while the next samples)")
    pairs_from: Literal["reference", "policy"] = field(
        "reference", help="online pairs: sample from the starting model (off-policy, as offline DPO) or the current one")
    min_reward_gap: float = field(0.0, help="online pairs: drop pairs whose reward gap is <= this (ties)")
    pairs_reuse: int = field(
        1, help="online pairs: train on each sampled batch of pairs for this many micro-steps, with fresh "
                "noise and timesteps each time (sampling dominates the cost; 1: new pairs every micro-step)")
    reference_update_rate: float = field(
        0.0, help="stable reference (our reading of Kang et al. 2025, whose code we could not check): ref <- ref + "
                  "rate * (policy - ref) after each step (0: frozen reference)")
    reference_anchor: float = field(
        0.0, help="stable reference (our reading, as above): ref <- ref - anchor * (ref - ref_0) after each update; "
                  "needs reference_update_rate > 0")
    timestep_weighting: Literal["none", "relative"] = field(
        "none", help="relative (our reading of Kang et al. 2025's timestep-aware training, no public code checked): "
                     "balance the margin's scale across timesteps by the reference's error scale")

    def __post_init__(self) -> None:
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(self.samples_per_prompt >= 2, f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        check(self.sample_batch_size >= 0, f"sample_batch_size must be >= 0, got {self.sample_batch_size}")
        check(0 <= self.reference_update_rate <= 1, f"reference_update_rate must be in [0, 1], got {self.reference_update_rate}")
        check(0 <= self.reference_anchor <= 1, f"reference_anchor must be in [0, 1], got {self.reference_anchor}")
        check(self.reference_anchor == 0 or self.reference_update_rate > 0,
              "reference_anchor pulls a moving reference back toward the start; with reference_update_rate 0 the "
              "reference is frozen and it does nothing: set reference_update_rate > 0 or remove it")
        check(self.pairs == "online" or bool(self.dataset), "pairs: offline needs method.dataset")
        check(self.min_reward_gap >= 0, f"min_reward_gap must be >= 0, got {self.min_reward_gap}")
        check(self.pairs_reuse >= 1, f"pairs_reuse must be >= 1, got {self.pairs_reuse}")
        check(0 <= self.proportion_empty_prompts <= 1,
              f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}")


def concat_conditioning(cond: Conditioning, times: int = 2) -> Conditioning:
    """The rows of ``cond`` repeated ``times`` times one after another (winners then losers)."""
    index = list(range(len(cond))) * times
    return cond.select(index)


@dataclass
class DPOBatch:
    """Preference pairs with the noise and timestep each pair shares (both images alike)."""

    pairs: PairBatch
    noise: Tensor  # (N, C, h, w)
    timesteps: Tensor  # (N,)


@register("diffusion_dpo")
class DiffusionDPO(BackboneMethod):
    summary = "Diffusion-DPO (Wallace et al. 2023): DPO on preference pairs through the denoising loss"
    Config = DiffusionDPOConfig

    def __init__(self, config: DiffusionDPOConfig, backbone: Backbone, reward: Reward | None, sample_config: Any):
        self.config = config
        self.backbone = backbone
        self.reward = reward
        self.sample_config = sample_config
        self.params = backbone.named_trainable_parameters()
        if not self.params:
            raise ConfigError("diffusion_dpo trains the backbone: set backbone.finetune to lora or full")
        if config.pairs == "online" and reward is None:
            raise ConfigError(f"{type(self).__name__}: online pairs are ranked by a reward; configure reward.name")
        backbone.keep_reference()  # the frozen starting model (a copy under full fine-tuning)
        denoiser = backbone.unwrapped_denoiser
        self.stable_reference = ShadowParameters(self.params, denoiser) if config.reference_update_rate > 0 else None
        self.start = ShadowParameters(self.params, denoiser) if config.reference_anchor > 0 else None
        self.data, self.rows = None, []
        self.buffer: PairBatch | None = None  # online pairs being reused (pairs_reuse > 1)
        self.buffer_uses = 0
        if config.pairs == "offline":
            self.data = load_pick_a_pic(str(config.dataset), config.dataset_split)
            self.rows = preference_rows(self.data, config.bad_rows)
            if not self.rows:
                raise ConfigError(f"preference dataset {config.dataset!r} has no strict preferences (all ties?)")

    @classmethod
    def build(cls, experiment: Any, backbone: Backbone | None, reward: Reward | None) -> DiffusionDPO:
        if backbone is None:
            raise ConfigError(f"{experiment.method_name} needs a backbone: set backbone.family and backbone.path")
        return cls(experiment.method, backbone, reward, experiment.sample)

    # ---------------------------------------------------------------- data

    def training_data(self) -> list[int] | None:
        """Offline pairs: the dataset's row indices (the trainer shuffles, shards and checkpoints them)."""
        return list(self.rows) if self.data is not None else None

    def prompts_of(self, items: list[Any]) -> list[str]:
        if self.data is None:
            return super().prompts_of(items)
        return [str(self.data[int(row)]["caption"]) for row in items]

    def reference(self) -> Any:
        if self.stable_reference is not None:
            return self.stable_reference.swapped()
        return self.backbone.reference()

    def pairs(self, items: list[Any], generator: torch.Generator) -> PairBatch:
        """Offline: the pairs of these dataset rows; online: sampled and ranked for these prompts."""
        if self.data is not None:
            rows = [int(row) for row in items]
            return offline_pairs(self.backbone, self.data, rows, generator, self.config.random_crop, self.config.hflip,
                                 skip_bad_rows=self.config.bad_rows == "skip",
                                 sample_posterior=self.config.vae_latents == "sample")
        if self.buffer is not None and self.buffer_uses < self.config.pairs_reuse:
            self.buffer_uses += 1
            return self.buffer
        s = self.sample_config
        pairs = online_pairs(self.backbone, self.reward, items, generator, self.config.samples_per_prompt,
                             s.num_steps, s.guidance_scale, s.eta, self.config.pairs_from == "reference",
                             self.config.min_reward_gap, self.config.sample_batch_size or None)
        self.buffer, self.buffer_uses = pairs, 1
        return pairs

    def drop_captions(self, pairs: PairBatch, generator: torch.Generator) -> PairBatch:
        """Caption dropout: each pair's training conditioning becomes the empty prompt's with
        probability ``proportion_empty_prompts`` (both images of a pair alike); a new batch, the
        sampled pairs (which may be reused) keep their captions."""
        p = self.config.proportion_empty_prompts
        if p == 0 or len(pairs) == 0:
            return pairs
        dropped = (torch.rand(len(pairs), generator=generator) < p).tolist()
        # the metric on every micro-step (processes average metrics by name: all must report it)
        metrics = {**pairs.metrics, "captions_dropped": torch.tensor(sum(dropped) / len(dropped))}
        if not any(dropped):
            return dataclasses.replace(pairs, metrics=metrics)
        captions = ["" if drop else prompt for drop, prompt in zip(dropped, pairs.prompts)]
        cond = self.backbone.encode_prompts(captions, guidance=False)
        return dataclasses.replace(pairs, cond=cond, metrics=metrics)

    def collect(self, prompts: list[str], generator: torch.Generator) -> DPOBatch:
        pairs = self.drop_captions(self.pairs(prompts, generator), generator)
        n = len(pairs)
        noise = torch.randn(pairs.x0_w.shape, generator=generator).to(pairs.x0_w)
        timesteps = self.backbone.schedule.sample_training_timesteps(n, generator).to(self.backbone.device)
        return DPOBatch(pairs, noise, timesteps)

    # ---------------------------------------------------------------- loss

    def errors(self, pairs: PairBatch, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample MSE (2N,) of the policy (with grad) and the reference (without), winners first;
        both images of a pair share the noise and the timestep."""
        schedule = self.backbone.schedule
        x0 = torch.cat([pairs.x0_w, pairs.x0_l])
        noise, t = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
        x_t = schedule.add_noise(x0, noise, t)
        target = schedule.training_target(x0, noise, t)
        cond = concat_conditioning(pairs.cond)
        # the reference first: a stable reference swaps values into the parameters, which must not
        # change between the policy's forward and its backward
        with torch.no_grad(), self.reference():
            ref_err = per_sample_mse(self.backbone.predict(x_t, t, cond), target)
        with self.backbone.training():
            model_err = per_sample_mse(self.backbone.predict(x_t, t, cond), target)
        return model_err, ref_err

    def loss(self, batch: DPOBatch) -> tuple[Tensor, dict[str, Tensor]]:
        pairs = batch.pairs
        if len(pairs) == 0:  # every pair was a tie
            return self.zero_loss(), dict(pairs.metrics)
        model_err, ref_err = self.errors(pairs, batch.noise, batch.timesteps)
        model_w, model_l = model_err.chunk(2)
        ref_w, ref_l = ref_err.chunk(2)
        weights = timestep_balance_weights(ref_w, ref_l) if self.config.timestep_weighting == "relative" else None
        loss = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, self.config.beta, weights)
        metrics = {
            **pairs.metrics,
            "implicit_accuracy": implicit_accuracy(model_w, model_l, ref_w, ref_l),
            "model_mse_w": model_w.detach().mean(), "model_mse_l": model_l.detach().mean(),
            "ref_mse_w": ref_w.mean(), "ref_mse_l": ref_l.mean(),
        }
        return loss, metrics

    # ---------------------------------------------------------------- the rest of the contract

    def after_optimizer_step(self) -> None:
        if self.stable_reference is None:
            return
        self.stable_reference.update(self.config.reference_update_rate)
        if self.start is not None:
            for name, value in self.stable_reference.shadow.items():
                value.lerp_(self.start.shadow[name], self.config.reference_anchor)

    def state_dict(self) -> dict[str, Any]:
        """What every process shares: the stable reference."""
        return {"stable_reference": self.stable_reference.state_dict() if self.stable_reference else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stable_reference is not None:
            self.stable_reference.load_state_dict(state["stable_reference"])
        if "buffer" in state:  # a checkpoint from before the per-process split
            self.load_process_state_dict(state)

    def process_state_dict(self) -> dict[str, Any]:
        """This process's online pairs being reused (a resumed run reuses the same pairs)."""
        state: dict[str, Any] = {}
        if self.buffer is not None and self.config.pairs_reuse > 1:
            b = self.buffer
            state["buffer"] = {"x0_w": b.x0_w.cpu(), "x0_l": b.x0_l.cpu(), "prompts": list(b.prompts),
                               "metrics": {k: v.cpu() for k, v in b.metrics.items()}, "uses": self.buffer_uses}
        return state

    def load_process_state_dict(self, state: dict[str, Any]) -> None:
        if "buffer" in state:
            b, device = state["buffer"], self.backbone.device
            cond = self.backbone.encode_prompts(b["prompts"], guidance=False)
            self.buffer = PairBatch(cond, b["x0_w"].to(device), b["x0_l"].to(device), b["prompts"],
                                    {k: v.to(device) for k, v in b["metrics"].items()})
            self.buffer_uses = b["uses"]
