"""ReNO (Eyring et al. 2024, "ReNO: Enhancing One-step Text-to-Image Models through Reward-based
Noise Optimization"): at inference time, optimise the initial noise of a one- or few-step generator
to maximise differentiable rewards, with gradients through the generator and the VAE decoder.

Objective per sample: ``reward_loss(noise) + lambda * noise_regularizer(noise)`` with
reward_loss = -(weighted sum of rewards) and the regulariser the negative log-density of the chi
distribution of ||noise|| (d degrees of freedom): ``0.5 ||n||^2 - (d - 1) log ||n||``, minimal at
||n|| = sqrt(d - 1), which keeps the noise where a standard Gaussian puts its mass.
Paper defaults: SGD lr 5, momentum 0.9, Nesterov, gradient-norm clip 0.1, 50 iterations,
lambda 0.01; the best image by reward loss (regulariser excluded), the start included, is kept.
As the official loop (ExplainableML/ReNO ``training/trainer.py``), ``iterations`` counts reward
evaluations, the first on the starting noise, with an optimizer step after each but the last
(iterations - 1 steps); Adam takes the official ``eps=1e-2`` (``training/optim.py``): with the
usual 1e-8 its first step moves every element by about lr whatever the clipped gradient, which at
lr 5 replaces the noise.

Beyond the official code (one prompt at a time): a batch of prompts x seeds is optimised at once
(gradients are clipped per sample, so each sample follows the path it would alone), the best seed
per prompt is returned, and optimisation stops early once no sample improved for ``patience``
iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from genalign.core.config import check
from genalign.core.config import field as config_field
from genalign.core.rollout import draw_noise, repeat_prompts, rollout
from genalign.core.types import Backbone, Conditioning, Reward

ADAM_EPS = 1e-2  # the official code's Adam eps



def noise_regularizer(noise: Tensor) -> Tensor:
    """(B,) ``0.5 * ||n||^2 - (d - 1) * log ||n||`` per sample (fp32), d = elements of one sample."""
    flat = noise.float().flatten(1)
    norm = flat.norm(dim=1)
    return 0.5 * norm.pow(2) - (flat.shape[1] - 1) * torch.log(norm)


@dataclass
class RenoConfig:
    num_steps: int = config_field(1, help="generator steps (one-step models: 1; the shapes models: 1-4)")
    guidance_scale: float = config_field(1.0, help="generator guidance (turbo models: 1)")
    iterations: int = config_field(
        50, help="reward evaluations, the first on the starting noise, each but the last followed by a step "
                 "(paper: 50; 1 = plain sampling)")
    optimizer: Literal["sgd", "adam"] = config_field(
        "sgd", help="sgd (paper: lr 5, momentum 0.9, Nesterov) or adam (eps 1e-2, as the official code)")
    lr: float = config_field(5.0, help="learning rate (paper: 5 with SGD)")
    momentum: float = config_field(0.9, help="SGD momentum (paper: 0.9, Nesterov)")
    grad_clip: float = config_field(0.1, help="per-sample gradient-norm clip (paper: 0.1; 0: off)")
    reg_weight: float = config_field(0.01, help="lambda of the noise-norm regulariser (paper: 0.01)")
    seeds_per_prompt: int = config_field(1, help="initial noises per prompt; the best is returned")
    patience: int = config_field(0, help="stop when no sample improved for this many iterations (0: never)")

    def __post_init__(self) -> None:
        check(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        check(self.iterations >= 1, f"iterations (reward evaluations) must be >= 1, got {self.iterations}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.seeds_per_prompt >= 1, f"seeds_per_prompt must be >= 1, got {self.seeds_per_prompt}")
        check(self.grad_clip >= 0 and self.reg_weight >= 0 and self.patience >= 0,
              "grad_clip, reg_weight and patience must be >= 0")


@dataclass
class RenoResult:
    images: Tensor  # (P, 3, H, W) best image per prompt
    noise: Tensor  # (P, C, h, w) its noise
    initial_images: Tensor  # (P, 3, H, W) the plain samples of the same seeds (the first seed)
    best_reward: Tensor  # (P,) reward of the returned images
    initial_reward: Tensor  # (P,) reward of the first seed's plain sample
    history: list[list[float]] = field(default_factory=list)  # per evaluation: reward of every sample
    iterations_run: int = 0  # reward evaluations made (fewer than ``iterations`` after an early stop)


def _generate(backbone: Backbone, prompts: list[str], cond: Conditioning, noise: Tensor, config: RenoConfig) -> Tensor:
    """The images of ``noise``, differentiable with respect to it."""
    return rollout(backbone, prompts, config.num_steps, config.guidance_scale, cond=cond,
                   latents=noise.to(backbone.dtype), grad_last_k=-1).images


def make_optimizer(noise: Tensor, config: RenoConfig) -> torch.optim.Optimizer:
    """The optimiser of the noise: SGD (momentum, Nesterov when momentum > 0) or Adam with eps 1e-2."""
    if config.optimizer == "sgd":
        return torch.optim.SGD([noise], lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.Adam([noise], lr=config.lr, eps=ADAM_EPS)


def reno(
    backbone: Backbone,
    reward: Reward,
    prompts: list[str],
    config: RenoConfig,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    progress: bool = False,
) -> RenoResult:
    """Optimise the initial noise of ``prompts`` x ``seeds_per_prompt`` samples (sample j of prompt i
    at row i * seeds + j); returns each prompt's best image and noise."""
    if not getattr(reward, "differentiable", False):
        raise ValueError("ReNO needs a differentiable reward (gradients flow from the pixels to the noise)")
    k = config.seeds_per_prompt
    repeated = repeat_prompts(prompts, k)
    if noise is None:
        noise = draw_noise(backbone, len(repeated), generator)
    noise = noise.detach().float().clone().requires_grad_(True)
    cond = backbone.encode_prompts(repeated, guidance=config.guidance_scale != 1.0)
    optimizer = make_optimizer(noise, config)
    best_reward = torch.full((len(repeated),), -float("inf"))
    best_noise = noise.detach().clone()
    best_images: Tensor | None = None
    initial_images, initial_reward = None, None
    history: list[list[float]] = []
    stale = 0
    iterations = range(config.iterations)  # evaluation i follows i optimizer steps
    if progress:
        from tqdm.auto import tqdm

        iterations = tqdm(iterations, desc="reno")
    done = 0
    for iteration in iterations:
        images = _generate(backbone, repeated, cond, noise, config)
        scores, _ = reward(images, repeated)
        scores = scores.float()
        current = scores.detach().cpu()
        history.append(current.tolist())
        if initial_images is None:
            initial_images, initial_reward = images.detach().cpu(), current.clone()
            best_images = images.detach().cpu().clone()
        improved = current > best_reward
        if improved.any():
            best_reward = torch.where(improved, current, best_reward)
            best_noise[improved.to(best_noise.device)] = noise.detach()[improved.to(noise.device)]
            best_images[improved] = images.detach().cpu()[improved]
            stale = 0
        else:
            stale += 1
        done = iteration + 1
        if done == config.iterations or (config.patience and stale >= config.patience):
            break
        loss = -scores.to(noise.device) + config.reg_weight * noise_regularizer(noise)
        optimizer.zero_grad()
        loss.sum().backward()  # samples are independent: the sum gives each its own gradient
        if config.grad_clip:
            with torch.no_grad():
                norms = noise.grad.flatten(1).norm(dim=1).clamp_min(1e-12)
                noise.grad.mul_((config.grad_clip / norms).clamp(max=1.0).view(-1, *[1] * (noise.ndim - 1)))
        optimizer.step()
    assert best_images is not None and initial_images is not None and initial_reward is not None
    per_prompt = best_reward.view(len(prompts), k)
    choice = per_prompt.argmax(1) + torch.arange(len(prompts)) * k
    first = torch.arange(len(prompts)) * k
    return RenoResult(best_images[choice], best_noise[choice.to(best_noise.device)].cpu(), initial_images[first],
                      best_reward[choice], initial_reward[first], history, done)


def reno_in_batches(backbone: Backbone, reward: Reward, prompts: list[str], config: RenoConfig, seed: int = 0,
                    batch_size: int = 64, progress: bool = False) -> list[RenoResult]:
    """:func:`reno` on ``batch_size`` prompts at a time; the batch starting at prompt f draws its
    noise from ``seed * 1_000_003 + f`` (the same images however many batches came before)."""
    return [reno(backbone, reward, prompts[first : first + batch_size], config,
                 torch.Generator().manual_seed(seed * 1_000_003 + first), progress=progress)
            for first in range(0, len(prompts), batch_size)]


def write_reno(out: Path, prompts: list[str], results: list[RenoResult], config: RenoConfig,
               gold: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``images/`` (best), ``initial/`` (plain samples of the same seeds), ``noise.safetensors``,
    ``grid.png`` (plain row above ReNO row) and ``reno.json``; returns reno.json's content. ``gold``:
    an exact evaluation of the plain and ReNO images (``genalign.shapes.scoring.paired_gold``),
    stored as ``gold_initial``, ``gold_reno``, ``gold_gain`` and ``gold_verdicts``."""
    import json

    from safetensors.torch import save_file
    from torchvision.utils import save_image

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "initial").mkdir(exist_ok=True)
    images = torch.cat([r.images for r in results])
    initial = torch.cat([r.initial_images for r in results])
    for i in range(len(prompts)):
        save_image(images[i], out / "images" / f"{i:04d}.png")
        save_image(initial[i], out / "initial" / f"{i:04d}.png")
    save_file({"noise": torch.cat([r.noise for r in results]).contiguous()}, str(out / "noise.safetensors"))
    summary: dict[str, Any] = {
        "prompts": prompts, "reward_initial": torch.cat([r.initial_reward for r in results]).tolist(),
        "reward_best": torch.cat([r.best_reward for r in results]).tolist(), "history": [r.history for r in results],
        "iterations_run": [r.iterations_run for r in results], "config": vars(config)}
    if gold is not None:
        summary.update(gold_initial=gold["before"], gold_reno=gold["after"], gold_gain=gold["gain"],
                       gold_verdicts={"plain": gold["verdicts_before"], "reno": gold["verdicts_after"],
                                      "tags": gold["tags"]})
    per_row = min(8, len(prompts))
    save_image(torch.cat([initial[:per_row], images[:per_row]]), out / "grid.png", nrow=per_row)
    (out / "reno.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def reno_sampler(backbone: Backbone, reward: Reward, num_steps: int, guidance_scale: float, iterations: int = 50,
                 lr: float = 5.0) -> Callable[[list[str], list[int]], Tensor]:
    """A generator that runs ReNO (noise optimisation for ``reward``) on ``backbone``: each batch
    starts from the noise of its first seed's generator."""
    config = RenoConfig(num_steps=num_steps, guidance_scale=guidance_scale, iterations=iterations, lr=lr)

    def generate(prompts: list[str], seeds: list[int]) -> Tensor:
        return reno(backbone, reward, prompts, config, torch.Generator().manual_seed(seeds[0])).images.float().cpu()

    return generate
