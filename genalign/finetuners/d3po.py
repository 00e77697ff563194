"""D3PO (Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward
Model"): DPO applied to each denoising step of two stochastic trajectories from the same initial
noise, with a preference between their final images and no reward model in the loss.

Per step, with rho_i = clamp(p_theta(x_{t-1}^i | x_t^i) / p_ref(...), 1 - c, 1 + c):

    loss = -log sigmoid(beta * h0 * log rho_0 + beta * h1 * log rho_1)

(h0, h1) = (+1, -1) when sample 0 is preferred, (-1, +1) when sample 1 is, (0, 0) for a tie. This
is the official code's (yk7333/d3po, scripts/train.py): a hard clamp of the ratio (its gradient is
zero outside [1 - c, 1 + c], unlike PPO's min), log-probs averaged over the latent's elements, a
frozen copy of the starting model as reference, classifier-free guidance applied to policy and
reference alike; defaults beta 0.1, c = 0.1 (``train.eps``), eta 1, lr 3e-5, LoRA. The official code takes one
optimizer step per pair (``train.batch_size = 1``); genalign one per rollout over all its pairs.

Preferences come from a reward (scalar: the higher score wins; a weighted sum's member scores as
a vector: Pareto dominance), or from human labels of pairs written by ``genalign d3po sample``.
With ``samples_per_prompt`` k > 2 every pair among a prompt's k samples is used.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from genalign.core.config import ConfigError, check, field
from genalign.core.rollout import rollout as core_rollout
from genalign.core.sampler import log_probs_of
from genalign.core.types import Backbone, Reward, Trajectory, reward_label
from genalign.finetuners import register
from genalign.finetuners.common import BackboneMethod, LossInParts, OverlappedScores

# ------------------------------------------------------------------ the objective (pure functions)


def d3po_loss(
    logp_0: Tensor, ref_logp_0: Tensor, logp_1: Tensor, ref_logp_1: Tensor, preference: Tensor,
    beta: float = 0.1, clip_range: float = 0.1,
) -> Tensor:
    """Batch mean of ``-log sigmoid(beta * h0 * log rho_0 + beta * h1 * log rho_1)`` for one denoising
    step; inputs (B,) log-probs of the step under policy and reference for samples 0 and 1,
    ``preference`` (B,) +1 (sample 0 preferred), -1 (sample 1) or 0 (tie: log 2, no gradient)."""
    low, high = 1.0 - clip_range, 1.0 + clip_range
    log_rho_0 = torch.log(torch.clamp(torch.exp(logp_0 - ref_logp_0), low, high))
    log_rho_1 = torch.log(torch.clamp(torch.exp(logp_1 - ref_logp_1), low, high))
    h0 = preference.to(log_rho_0.dtype)
    return -F.logsigmoid(beta * h0 * log_rho_0 - beta * h0 * log_rho_1).mean()


def preferences_from_scores(scores_0: Tensor, scores_1: Tensor, tie_margin: float = 0.0) -> Tensor:
    """+1 / -1 / 0 per pair. Scores (B,): the higher wins unless they differ by <= ``tie_margin``.
    Vectors (B, K): Pareto dominance (>= in every component, > in one; anything else is a tie)."""
    if scores_0.ndim == 1:
        diff = scores_0 - scores_1
        return torch.where(diff.abs() <= tie_margin, 0.0, torch.sign(diff))
    geq, gt = (scores_0 >= scores_1).all(1), (scores_0 > scores_1).any(1)
    leq, lt = (scores_0 <= scores_1).all(1), (scores_0 < scores_1).any(1)
    return (geq & gt).float() - (leq & lt).float()


def all_pairs(num_prompts: int, samples_per_prompt: int) -> tuple[Tensor, Tensor]:
    """Indices (a, b) of every pair i < j among each prompt's consecutive samples."""
    first, second = torch.triu_indices(samples_per_prompt, samples_per_prompt, offset=1)
    base = torch.arange(num_prompts).repeat_interleave(first.numel()) * samples_per_prompt
    return base + first.repeat(num_prompts), base + second.repeat(num_prompts)


@torch.no_grad()
def rollout(backbone: Backbone, prompts: list[str], samples_per_prompt: int, sample_config: Any,
            generator: torch.Generator, chunk_size: int | None = None, on_chunk: Any = None) -> tuple[Trajectory, Tensor]:
    """k stochastic trajectories per prompt (consecutive) from one shared initial noise; their
    final images (B * k, 3, H, W) in [0, 1] (sampled ``chunk_size`` images at a time, each chunk
    passed to ``on_chunk``)."""
    s = sample_config
    r = core_rollout(backbone, prompts, s.num_steps, s.guidance_scale, s.eta, samples_per_prompt=samples_per_prompt,
                     shared_noise=True, generator=generator, sde=s.sde, chunk_size=chunk_size, on_chunk=on_chunk)
    return r.trajectory, r.images


# ------------------------------------------------------------------ labelled pairs on disk


def read_labels(path: str | Path) -> dict[str, float]:
    """Human labels: JSON ``{pair_id: 0 | 1 | "tie"}`` or JSONL lines ``{"id": ..., "preferred": 0 | 1 |
    "tie"}`` -> pair id -> preference (+1: image 0 preferred, -1: image 1, 0: tie)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            lines = [line for line in text.splitlines() if line.strip()]
            if lines and not text.endswith("\n"):
                try:
                    json.loads(lines[-1])
                except json.JSONDecodeError:  # a write torn by a crash: that label was never recorded
                    print(f"genalign: {path}: ignoring an incomplete last line (a label written while crashing)",
                          file=sys.stderr)
                    lines = lines[:-1]
            rows = [json.loads(line) for line in lines]
            raw = {str(r["id"]): r["preferred"] for r in rows}
        else:
            raw = {str(k): v for k, v in json.loads(text).items()}
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise ConfigError(f"{path}: labels must be {{id: 0|1|'tie'}} (JSON) or lines with id and preferred (JSONL): {err}") from err
    values = {0: 1.0, 1: -1.0, "0": 1.0, "1": -1.0, "tie": 0.0}
    bad = {k: v for k, v in raw.items() if v not in values}
    if bad:
        raise ConfigError(f"{path}: a label must be 0, 1 or 'tie'; got {dict(list(bad.items())[:3])}")
    return {k: values[v] for k, v in raw.items()}


def save_pairs(directory: Path, trajectory: Trajectory, images: Tensor, prompts: list[str], start_id: int = 0) -> list[str]:
    """Write pairs (two trajectories of one prompt, consecutive in ``trajectory``) for labelling:
    ``pairs.jsonl`` (id, prompt, the two image files), PNGs, and each pair's trajectory
    (``trajectories/<id>.safetensors``: latents (T+1, 2, C, h, w), timesteps)."""
    from safetensors.torch import save_file
    from torchvision.utils import save_image

    (directory / "images").mkdir(parents=True, exist_ok=True)
    (directory / "trajectories").mkdir(exist_ok=True)
    ids = []
    with open(directory / "pairs.jsonl", "a") as index:
        for n, prompt in enumerate(prompts):
            pair_id = f"{start_id + n:06d}"
            files = []
            for side in (0, 1):
                file = f"images/{pair_id}-{side}.png"
                save_image(images[2 * n + side].float().clamp(0, 1), directory / file)
                files.append(file)
            save_file({"latents": trajectory.latents[:, 2 * n : 2 * n + 2].float().cpu().contiguous(),
                       "timesteps": trajectory.timesteps.cpu().contiguous()},
                      str(directory / "trajectories" / f"{pair_id}.safetensors"))
            index.write(json.dumps({"id": pair_id, "prompt": prompt, "images": files,
                                    "eta": trajectory.eta, "guidance_scale": trajectory.guidance_scale}) + "\n")
            ids.append(pair_id)
    return ids


def sample_pairs(backbone: Backbone, prompts: list[str], num_pairs: int, sample_config: Any, out: Path,
                 seed: int = 0, batch_size: int = 8) -> int:
    """Append ``num_pairs`` pairs (prompts shuffled by ``seed``, cycled) to ``out`` for labelling
    (:func:`save_pairs`'s layout); returns the number written."""
    import random

    if sample_config.eta <= 0:
        raise ConfigError("d3po pairs need a stochastic sampler: set sample.eta > 0")
    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    chosen = [prompts[i % len(prompts)] for i in range(num_pairs)]
    out.mkdir(parents=True, exist_ok=True)
    index = out / "pairs.jsonl"
    start = sum(1 for _ in index.open()) if index.is_file() else 0
    generator = torch.Generator().manual_seed(seed)
    written = 0
    for first in range(0, len(chosen), batch_size):
        batch = chosen[first : first + batch_size]
        trajectory, images = rollout(backbone, batch, 2, sample_config, generator)
        written += len(save_pairs(out, trajectory, images, batch, start + written))
    return written


# ------------------------------------------------------------------ the method


@dataclass
class D3POBatch:
    """Pairs (a[i], b[i]) of rows of ``trajectory`` (ties dropped) with their preference (+1: a
    preferred, -1: b), the denoising steps trained, and the collection's metrics."""

    trajectory: Trajectory
    a: Tensor
    b: Tensor
    preference: Tensor
    steps: Tensor
    metrics: dict[str, Tensor]


@dataclass
class D3POConfig:
    beta: float = field(0.1, help="DPO temperature on the per-step log-ratios (paper: 0.1)")
    clip_range: float = field(
        0.1, help="the ratio is clamped to [1 - c, 1 + c] (official: train.eps = 0.1)")
    timestep_fraction: float = field(1.0, help="fraction of the denoising steps trained per batch (paper: 1.0)")
    samples_per_prompt: int = field(2, help="trajectories per prompt from the same initial noise; all pairs are used")
    sample_batch_size: int = field(0, help="images per sampling call during rollouts (0: the whole rollout at once; "
                                           "a served reward scores each while the next samples)")
    preferences: Literal["reward", "labels"] = field(
        "reward", help="reward: compare reward scores; labels: human labels of pairs from `genalign d3po sample`")
    pareto: bool = field(False, help="reward preferences: compare a weighted sum's member scores by Pareto dominance")
    tie_margin: float = field(0.0, help="reward preferences: score differences <= this are ties (no gradient)")
    pairs_dir: str | None = field(None, help="labels: the folder written by `genalign d3po sample`")
    labels: str | None = field(None, help="labels: JSON {id: 0|1|'tie'} or JSONL {id, preferred}")

    def __post_init__(self) -> None:
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(0 < self.clip_range < 1, f"clip_range must be in (0, 1), got {self.clip_range}")
        check(0 < self.timestep_fraction <= 1, f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        check(self.samples_per_prompt >= 2, f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        check(self.sample_batch_size >= 0, f"sample_batch_size must be >= 0, got {self.sample_batch_size}")
        check(self.preferences == "reward" or bool(self.pairs_dir and self.labels),
              "preferences: labels needs method.pairs_dir and method.labels")


@register("d3po")
class D3PO(LossInParts, BackboneMethod):
    summary = "D3PO (Yang et al. 2024): DPO on paired sampling trajectories, from a reward or human labels"
    Config = D3POConfig

    def __init__(self, config: D3POConfig, backbone: Backbone, reward: Reward | None, sample_config: Any):
        self.config, self.backbone, self.reward, self.sample_config = config, backbone, reward, sample_config
        self.params = backbone.named_trainable_parameters()
        if not self.params:
            raise ConfigError("d3po trains the backbone: set backbone.finetune to lora or full")
        if config.preferences == "reward" and reward is None:
            raise ConfigError("d3po with preferences: reward needs a reward; configure reward.name (or use labels)")
        if sample_config.eta <= 0:
            raise ConfigError("d3po needs stochastic rollouts: set sample.eta > 0 (paper: 1.0; flow models: the SDE noise level)")
        backbone.keep_reference()  # the frozen starting model (a copy under full fine-tuning)
        self.labels: dict[str, float] = {}
        self.pair_info: dict[str, dict[str, Any]] = {}
        if config.preferences == "labels":
            self.labels = read_labels(str(config.labels))
            index = Path(str(config.pairs_dir)) / "pairs.jsonl"
            if not index.is_file():
                raise ConfigError(f"{config.pairs_dir} has no pairs.jsonl (write it with `genalign d3po sample`)")
            self.pair_info = {r["id"]: r for r in map(json.loads, index.read_text().splitlines()) if r}
            unknown = set(self.labels) - set(self.pair_info)
            if unknown:
                raise ConfigError(f"labels for pairs not in {index}: {sorted(unknown)[:5]}")

    @classmethod
    def build(cls, experiment: Any, backbone: Backbone | None, reward: Reward | None) -> D3PO:
        if backbone is None:
            raise ConfigError("d3po needs a backbone: set backbone.family and backbone.path")
        return cls(experiment.method, backbone, reward, experiment.sample)

    def training_data(self) -> list[str] | None:
        """Labelled pairs' ids (ties dropped: they give no gradient) when learning from labels."""
        if not self.labels:
            return None
        ids = [pair_id for pair_id, label in sorted(self.labels.items()) if label != 0]
        if not ids:
            raise ConfigError("every labelled pair is a tie: nothing to learn from")
        return ids

    def prompts_of(self, items: list[Any]) -> list[str]:
        return [self.pair_info[i]["prompt"] for i in items] if self.labels else super().prompts_of(items)

    # ---------------------------------------------------------------- rollouts

    def _scores(self, images: Tensor, prompts: list[str], overlapped: OverlappedScores | None = None) -> Tensor:
        assert self.reward is not None
        scores, subscores = overlapped.results() if overlapped is not None else self.reward(images, prompts)
        if not self.config.pareto:
            return scores
        # the members' scores: every sub-score but the total's (a served weighted sum's too)
        names = [k for k in subscores if k not in (getattr(self.reward, "name", None), reward_label(self.reward))]
        if len(names) < 2:
            raise ConfigError("pareto preferences need several rewards (a list under reward:)")
        return torch.stack([subscores[n] for n in names], dim=1)  # (B, K)

    def _labelled(self, prompts: list[str]) -> tuple[Trajectory, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        from safetensors.torch import load_file

        ids = list(prompts)  # labelled pair ids
        saved = [load_file(str(Path(str(self.config.pairs_dir)) / "trajectories" / f"{i}.safetensors")) for i in ids]
        info = [self.pair_info[i] for i in ids]
        guidance, eta = info[0]["guidance_scale"], info[0]["eta"]
        repeated = [r["prompt"] for r in info for _ in range(2)]
        cond = self.backbone.encode_prompts(repeated, guidance=guidance != 1.0)
        latents = torch.cat([s["latents"] for s in saved], dim=1).to(self.backbone.device, self.backbone.dtype)
        trajectory = Trajectory(latents, saved[0]["timesteps"].to(self.backbone.device), torch.zeros(0), torch.zeros(0),
                                torch.zeros(0), cond, eta, guidance)
        a, b = all_pairs(len(ids), 2)
        preference = torch.tensor([self.labels[i] for i in ids])
        return trajectory, a, b, preference, {"pairs": torch.tensor(float(len(ids)))}

    def collect(self, prompts: list[str], generator: torch.Generator) -> D3POBatch:
        if self.labels:
            trajectory, a, b, preference, metrics = self._labelled(prompts)
        else:
            repeated = [p for p in prompts for _ in range(self.config.samples_per_prompt)]
            # a served reward scores each chunk while the next is sampled: the same scores
            with OverlappedScores.for_reward(self.reward, repeated) or nullcontext() as overlapped:
                trajectory, images = rollout(self.backbone, prompts, self.config.samples_per_prompt, self.sample_config,
                                             generator, self.config.sample_batch_size or None, overlapped)
                scores = self._scores(images, repeated, overlapped)
            a, b = all_pairs(len(prompts), self.config.samples_per_prompt)
            preference = preferences_from_scores(scores[a], scores[b], self.config.tie_margin)
            total = scores if scores.ndim == 1 else scores.sum(1)
            metrics = {"reward_mean": total.mean(), "ties": (preference == 0).float().mean()}
        # ties give no gradient: skip their compute. On the host, where the pair indices live (a CUDA
        # mask cannot index a CPU tensor, and the kept count sizes the batch: one sync a rollout)
        keep = (preference != 0).cpu()
        steps = torch.arange(trajectory.num_steps)
        trained = max(1, math.ceil(self.config.timestep_fraction * trajectory.num_steps))
        if trained < trajectory.num_steps:
            steps = torch.randperm(trajectory.num_steps, generator=generator)[:trained].sort().values
        return D3POBatch(trajectory, a[keep], b[keep], preference[keep].to(self.backbone.device), steps, metrics)

    # ---------------------------------------------------------------- loss

    def _step_log_probs(self, trajectory: Trajectory, step: int, rows: Tensor) -> Tensor:
        sub = Trajectory(trajectory.latents[:, rows], trajectory.timesteps, trajectory.log_probs, trajectory.means,
                         trajectory.stds, trajectory.cond.select(rows), trajectory.eta, trajectory.guidance_scale,
                         trajectory.sde)
        return log_probs_of(self.backbone, sub, [step])[:, 0]

    def _loss_parts(self, batch: D3POBatch, metrics: dict[str, Tensor]) -> Iterator[Tensor]:
        """The per-step losses, each divided by the number of trained steps (LossInParts)."""
        trajectory, a, b, preference = batch.trajectory, batch.a, batch.b, batch.preference
        metrics.update(batch.metrics)
        if a.numel() == 0:
            yield self.zero_loss()
            return
        rows = torch.unique(torch.cat([a, b]))  # the samples that appear in a non-tie pair
        position = {int(r): i for i, r in enumerate(rows.tolist())}
        ia = torch.tensor([position[int(i)] for i in a])
        ib = torch.tensor([position[int(i)] for i in b])
        log_ratio_preferred, log_ratio_other = 0.0, 0.0
        steps = batch.steps.tolist()
        for step in steps:
            with torch.no_grad(), self.backbone.reference():
                ref = self._step_log_probs(trajectory, step, rows)
            with self.backbone.training():
                logp = self._step_log_probs(trajectory, step, rows)
            ratio = (logp - ref).detach()
            preferred_first = preference > 0
            log_ratio_preferred += torch.where(preferred_first, ratio[ia], ratio[ib]).mean() / len(steps)
            log_ratio_other += torch.where(preferred_first, ratio[ib], ratio[ia]).mean() / len(steps)
            yield d3po_loss(logp[ia], ref[ia], logp[ib], ref[ib], preference, self.config.beta,
                            self.config.clip_range) / len(steps)
        metrics.update({"log_ratio_preferred": log_ratio_preferred, "log_ratio_other": log_ratio_other,
                        "pairs_trained": torch.tensor(float(a.numel()))})
