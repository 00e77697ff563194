"""The generic sampler: drives any Backbone through its NoiseSchedule and records a Trajectory."""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from genalign.core.types import Backbone, Conditioning, Trajectory


def initial_noise(
    backbone: Backbone,
    batch: int,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Tensor:
    """Standard normal latents (B, C, h, w) drawn on the CPU (device-independent for a seed)."""
    shape = (batch, *backbone.latent_shape(height, width))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(backbone.device, backbone.dtype)


def sample(
    backbone: Backbone,
    cond: Conditioning,
    num_steps: int,
    guidance_scale: float = 1.0,
    eta: float | list[float] = 0.0,
    latents: Tensor | None = None,
    generator: torch.Generator | None = None,
    grad_last_k: int = 0,
    checkpoint_steps: bool = True,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
    sde: str = "default",
) -> Trajectory:
    """Run ``num_steps`` reverse steps from ``latents`` (or fresh noise) and keep everything.

    grad_last_k: gradients flow through the last K steps (``-1``: all steps, 0: none). Earlier
        steps run under ``no_grad``. With ``checkpoint_steps`` each differentiable step is
        recomputed in backward (activation memory of one step instead of K).
    The noise of stochastic steps (``eta > 0``) is drawn from ``generator``; ``eta`` is one value
    for every step or one per step (an SDE window: noise on some steps only).
    progress: show a progress bar over the steps.
    sde: the form of the stochastic steps (``default``, or ``cps`` / ``cps_gaussian`` for flow models).
    """
    if latents is None:
        latents = initial_noise(backbone, len(cond), generator, height, width)
    if isinstance(eta, (list, tuple)) and len(eta) != num_steps:
        raise ValueError(f"{len(eta)} per-step eta values for {num_steps} steps")
    timesteps = backbone.schedule.timesteps(num_steps)
    first_grad_step = 0 if grad_last_k < 0 else num_steps - grad_last_k

    xs, log_probs, means, stds = [latents], [], [], []
    x = latents
    steps = enumerate(timesteps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=num_steps, desc="sampling", leave=False)
    with ExitStack() as without_grad:
        if grad_last_k == 0 or not torch.is_grad_enabled():
            without_grad.enter_context(torch.no_grad())  # no step takes a gradient: the LoRA merged
            without_grad.enter_context(backbone.merged())
        for i, t in steps:
            with_grad = i >= first_grad_step and torch.is_grad_enabled()
            eta_i = float(eta[i]) if isinstance(eta, (list, tuple)) else eta
            noise = None
            if eta_i > 0:
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            with nullcontext() if with_grad else torch.no_grad():
                if with_grad and checkpoint_steps:
                    prev, log_prob, mean, std = checkpoint(
                        _one_step, backbone, x, t, cond, num_steps, guidance_scale, eta_i, noise, sde, use_reentrant=False
                    )
                else:
                    prev, log_prob, mean, std = _one_step(backbone, x, t, cond, num_steps, guidance_scale, eta_i, noise, sde)
            xs.append(prev)
            log_probs.append(log_prob)
            means.append(mean)
            stds.append(std)
            x = prev
    return Trajectory(
        latents=torch.stack(xs),
        timesteps=timesteps,
        log_probs=torch.stack(log_probs, dim=1),
        means=torch.stack(means),
        stds=torch.stack(stds),
        cond=cond,
        eta=list(eta) if isinstance(eta, (list, tuple)) else eta,
        guidance_scale=guidance_scale,
        sde=sde,
    )


def _one_step(
    backbone: Backbone,
    x: Tensor,
    t: Tensor,
    cond: Conditioning,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    noise: Tensor | None,
    sde: str = "default",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    model_output = backbone.predict(x, t, cond, guidance_scale)
    # The noise is drawn outside so that a checkpointed recomputation sees the same draw.
    step = backbone.schedule.step(x, model_output, t, num_steps, eta, noise=noise, sde=sde)
    return step.prev_sample, step.log_prob, step.mean, step.std


def log_probs_of(backbone: Backbone, trajectory: Trajectory, step_indices: Tensor | list[int]) -> Tensor:
    """Log-probs (B, len(step_indices)) of the stored transitions under the current model.

    The policy-gradient methods re-evaluate old trajectories with this (with gradients).
    """
    out = []
    for i in torch.as_tensor(step_indices).tolist():
        x = trajectory.latents[i]
        t = trajectory.timesteps[i]
        model_output = backbone.predict(x, t, trajectory.cond, trajectory.guidance_scale)
        step = backbone.schedule.step(
            x, model_output, t, trajectory.num_steps, trajectory.eta_at(i), prev_sample=trajectory.latents[i + 1],
            sde=trajectory.sde
        )
        out.append(step.log_prob)
    return torch.stack(out, dim=1)


@dataclass
class Inversion:
    """A deterministic inversion x_0 -> x_T and what the model said along it.

    states:      (T+1, B, C, H, W) in sampling order (states[0] = x_T, states[-1] = x_0)
    inputs:      (T, B, C, H, W) the state the model was evaluated at, per step (inversion order:
                 inputs[0] = x_0)
    timesteps:   (T,) the timestep of each evaluation (inversion order: least noisy first)
    predictions: (T, B, C, H, W) the model output at (inputs[i], timesteps[i])
    """

    states: Tensor
    inputs: Tensor
    timesteps: Tensor
    predictions: Tensor


@torch.no_grad()
def invert_trajectory(
    backbone: Backbone,
    latents: Tensor,
    cond: Conditioning,
    num_steps: int,
    guidance_scale: float = 1.0,
) -> Inversion:
    """Deterministic (DDIM / flow ODE) inversion of clean latents, keeping every model call."""
    timesteps = backbone.schedule.timesteps(num_steps).flip(0)
    states, inputs, predictions = [latents], [], []
    x = latents
    for t in timesteps:
        # The model is evaluated at the less noisy state with the target timestep t (the usual
        # approximation of DDIM inversion, as in Null-text Inversion and diffusers' DDIMInverseScheduler).
        model_output = backbone.predict(x, t, cond, guidance_scale)
        inputs.append(x)
        predictions.append(model_output)
        x = backbone.schedule.invert_step(x, model_output, t, num_steps)
        states.append(x)
    return Inversion(torch.stack(states[::-1]), torch.stack(inputs), timesteps, torch.stack(predictions))


def invert(
    backbone: Backbone,
    latents: Tensor,
    cond: Conditioning,
    num_steps: int,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Deterministic inversion: clean latents x_0 -> the x_T that the eta=0 sampler maps back to x_0.

    Returns all states (T+1, B, C, H, W) in sampling order (states[0] = x_T, states[-1] = x_0),
    so that ``sample(..., latents=states[0])`` retraces them approximately.
    """
    return invert_trajectory(backbone, latents, cond, num_steps, guidance_scale).states
