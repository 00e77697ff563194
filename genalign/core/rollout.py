"""The one rollout recipe: repeat the prompts, draw the initial noise, encode (with the guidance
branch when guided), sample, decode to images in [0, 1].

Every method that samples (DDPO, Flow-GRPO, D3PO, VARD, AC-Flow, online DPO pairs), the shapes
evaluator, benchmark generation, the demo, ``genalign sample`` and ReNO call :func:`rollout`; what
they differ in is a parameter:

- ``samples_per_prompt`` k: image i * k + j is sample j of prompt i (consecutive);
- ``shared_noise``: the k samples of a prompt start from one noise (D3PO; GRPO's option);
- ``seeds``: image i starts from the noise of ``torch.Generator().manual_seed(seeds[i])`` (the same
  image whatever the batch; evaluation and benchmarks), otherwise noise comes from ``generator``;
- ``latents``: start from given noise (ReNO optimises it, ``grad_last_k=-1``);
- ``chunk_size``: sample and decode that many images at a time (the conditioning is encoded once);
- ``cond``: a conditioning already encoded for the repeated prompts.

The noise is drawn before any sampling step, then the stochastic steps (``eta > 0``) draw from
``generator``: a seed gives the same images however the call is chunked into batches of prompts
only when ``seeds`` is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from genalign.core.sampler import initial_noise, sample
from genalign.core.types import Backbone, Conditioning, Trajectory


@dataclass
class Rollout:
    """prompts: the prompt of each image (repeated); images: (B, 3, H, W) float in [0, 1] on the
    backbone's device; trajectory: the sampler's record (a chunked rollout keeps its ``means`` /
    ``stds`` when they are per image, as the built-in schedules' are); stochastic_steps: the step
    indices whose transition has noise."""

    prompts: list[str]
    cond: Conditioning
    trajectory: Trajectory
    images: Tensor
    stochastic_steps: list[int]


def repeat_prompts(prompts: list[str], samples_per_prompt: int) -> list[str]:
    """Each prompt ``samples_per_prompt`` times, consecutively."""
    return [p for p in prompts for _ in range(samples_per_prompt)]


def draw_noise(
    backbone: Backbone,
    count: int,
    generator: torch.Generator | None = None,
    seeds: list[int] | None = None,
    repeat: int = 1,
) -> Tensor:
    """Initial noise for ``count`` images, each repeated ``repeat`` times (consecutive): from
    ``seeds`` (one per image, independent of batching) or from ``generator``."""
    if seeds is not None:
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} images")
        noise = torch.cat([initial_noise(backbone, 1, torch.Generator().manual_seed(s)) for s in seeds])
    else:
        noise = initial_noise(backbone, count, generator)
    return noise.repeat_interleave(repeat, dim=0) if repeat > 1 else noise


def rollout(
    backbone: Backbone,
    prompts: list[str],
    num_steps: int,
    guidance_scale: float = 1.0,
    eta: float | list[float] = 0.0,
    *,
    samples_per_prompt: int = 1,
    shared_noise: bool = False,
    generator: torch.Generator | None = None,
    seeds: list[int] | None = None,
    latents: Tensor | None = None,
    negative_prompts: list[str] | None = None,
    cond: Conditioning | None = None,
    chunk_size: int | None = None,
    grad_last_k: int = 0,
    progress: bool = False,
    sde: str = "default",
    on_chunk: Callable[[int, Tensor], None] | None = None,
) -> Rollout:
    """Sample ``samples_per_prompt`` images for each prompt (see the module docstring).

    seeds: one per prompt (shared noise) or one per image. negative_prompts: one per prompt.
    grad_last_k: gradients through the last K sampling steps and the decoder (``-1``: all; 0: none).
    sde: the form of the stochastic steps (``default``; ``cps`` or ``cps_gaussian`` for flow models).
    on_chunk: called with (index of its first image, images) as soon as each chunk is decoded, before
    the next is sampled (e.g. to have a served reward score it meanwhile).
    """
    k = samples_per_prompt
    repeated = repeat_prompts(prompts, k)
    if latents is None:
        if shared_noise:
            latents = draw_noise(backbone, len(prompts), generator, seeds, repeat=k)
        else:
            latents = draw_noise(backbone, len(repeated), generator, seeds)
    if len(latents) != len(repeated):
        raise ValueError(f"{len(latents)} initial latents for {len(repeated)} images")
    if cond is None:
        negative = None if negative_prompts is None else repeat_prompts(negative_prompts, k)
        with torch.no_grad():  # the text encoders are frozen
            cond = backbone.encode_prompts(repeated, negative, guidance=guidance_scale != 1.0)
    chunk = chunk_size or len(repeated)
    parts, images = [], []
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad_last_k != 0):
        for start in range(0, len(repeated), chunk):
            rows = slice(start, start + chunk)
            whole = chunk >= len(repeated)  # unsliced: a view of the noise changes its gradient's rounding
            part = sample(backbone, cond if whole else cond.select(rows), num_steps, guidance_scale, eta,
                          latents=latents if whole else latents[rows], generator=generator, grad_last_k=grad_last_k,
                          progress=progress, sde=sde)
            parts.append(part)
            images.append(backbone.decode(part.final).float().clamp(0, 1))
            if on_chunk is not None:
                on_chunk(start, images[-1])
    trajectory = parts[0] if len(parts) == 1 else _concatenate(parts, cond)
    stochastic = [i for i in range(num_steps) if any(bool((p.stds[i] > 0).any()) for p in parts)]
    return Rollout(repeated, cond, trajectory, torch.cat(images) if len(images) > 1 else images[0], stochastic)


def _concatenate(parts: list[Trajectory], cond: Conditioning) -> Trajectory:
    """One trajectory of the chunks' images; their step moments are kept where every chunk has them
    per image ((T, B_chunk, ...)), else dropped (see :class:`Rollout`)."""
    first = parts[0]
    per_image = all(p.means.ndim > 1 and p.stds.ndim > 1 and p.means.shape[1] == p.latents.shape[1] == p.stds.shape[1]
                    for p in parts)
    empty = torch.zeros(0)
    means = torch.cat([p.means for p in parts], dim=1) if per_image else empty
    stds = torch.cat([p.stds for p in parts], dim=1) if per_image else empty
    return Trajectory(torch.cat([p.latents for p in parts], dim=1), first.timesteps,
                      torch.cat([p.log_probs for p in parts]), means, stds, cond, first.eta, first.guidance_scale,
                      first.sde)
