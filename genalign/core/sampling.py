"""Sampling math for variance-preserving diffusion: pure functions, no model inside.

Conventions (the ones of diffusers' ``DDIMScheduler`` and of ddpo-pytorch):

* ``x_t = sqrt(alpha_prod_t) * x_0 + sqrt(1 - alpha_prod_t) * eps`` where ``alpha_prod_t`` is the
  cumulative product of ``1 - beta`` up to timestep ``t``.
* ``model_output`` is interpreted by ``prediction_type``: ``"epsilon"`` (the noise),
  ``"v_prediction"`` (``v = sqrt(a) * eps - sqrt(1 - a) * x_0``, Salimans & Ho 2022) or
  ``"sample"`` (``x_0`` itself).
* Every step returns ``(prev_sample, log_prob, mean, std)``. ``log_prob`` is the Gaussian
  log-density of ``prev_sample`` under ``N(mean, std^2)``, averaged (not summed) over all
  non-batch dimensions, so it has shape ``[B]`` whatever the latent size (ddpo-pytorch's
  convention). A deterministic step (``std == 0``) has no density; its ``log_prob`` is 0.

``alpha_prod_t`` and ``alpha_prod_prev`` may be Python floats, 0-d tensors or ``[B]`` tensors
(one timestep per sample); they are broadcast against the latents.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _as_batch_broadcast(value: float | Tensor, like: Tensor) -> Tensor:
    """Turn a scalar or a ``[B]`` tensor into a tensor broadcastable to ``like`` (B, ...)."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(f"expected a scalar or a [B={like.shape[0]}] tensor, got shape {tuple(value.shape)}")
    return value.view(-1, *([1] * (like.ndim - 1)))


def surrogate_log_prob(sample: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """The official CPS surrogate -(sample - mean)^2, averaged over non-batch dims -> ``[B]`` (the
    Gaussian's exponent without 1 / (2 std^2) and constants; 0 where ``std == 0``, a deterministic step)."""
    std = torch.as_tensor(std, dtype=sample.dtype, device=sample.device).expand_as(sample)
    value = -((sample.detach() - mean) ** 2)
    value = torch.where(std == 0, torch.zeros_like(value), value)
    return value.mean(dim=tuple(range(1, sample.ndim)))


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Log N(sample; mean, std^2) per element, averaged over non-batch dims -> ``[B]``.

    Where ``std == 0`` the density is undefined and 0 is returned (deterministic step).
    """
    std = torch.as_tensor(std, dtype=sample.dtype, device=sample.device).expand_as(sample)
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    log_prob = -((sample.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_prob = torch.where(deterministic, torch.zeros_like(log_prob), log_prob)
    return log_prob.mean(dim=tuple(range(1, sample.ndim)))


def split_prediction(
    x_t: Tensor, model_output: Tensor, alpha_prod_t: float | Tensor, prediction_type: str = "epsilon"
) -> tuple[Tensor, Tensor]:
    """Return ``(pred_x0, pred_eps)`` from a model output of the given parameterisation."""
    a_t = _as_batch_broadcast(alpha_prod_t, x_t)
    sqrt_a, sqrt_1ma = a_t.sqrt(), (1 - a_t).sqrt()
    if prediction_type == "epsilon":
        pred_eps = model_output
        pred_x0 = (x_t - sqrt_1ma * pred_eps) / sqrt_a
    elif prediction_type == "v_prediction":
        pred_x0 = sqrt_a * x_t - sqrt_1ma * model_output
        pred_eps = sqrt_a * model_output + sqrt_1ma * x_t
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (x_t - sqrt_a * pred_x0) / sqrt_1ma
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return pred_x0, pred_eps


def ddim_step(
    x_t: Tensor,
    model_output: Tensor,
    alpha_prod_t: float | Tensor,
    alpha_prod_prev: float | Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12), stochastic for ``eta > 0``.

    sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mean  = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma^2) * eps_hat

    With ``eta = 0`` the mean is diffusers' ``DDIMScheduler.step(...).prev_sample``; with ``eta = 1``
    it is the DDPM posterior with the "fixed_small" variance (see :func:`ddpm_step`).
    If ``prev_sample`` is given, it is returned unchanged and ``log_prob`` is its density (used to
    re-evaluate stored trajectories under the current policy). ``noise`` (standard normal, the
    latents' shape) replaces the draw from ``generator``.
    """
    pred_x0, pred_eps = split_prediction(x_t, model_output, alpha_prod_t, prediction_type)
    a_t = _as_batch_broadcast(alpha_prod_t, x_t)
    a_prev = _as_batch_broadcast(alpha_prod_prev, x_t)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * pred_eps
    mean = a_prev.sqrt() * pred_x0 + direction
    return _finish_step(mean, std, prev_sample, generator, noise)


def ddpm_step(
    x_t: Tensor,
    model_output: Tensor,
    alpha_prod_t: float | Tensor,
    alpha_prod_prev: float | Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    prediction_type: str = "epsilon",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ancestral DDPM step from the posterior q(x_prev | x_t, x0_hat) (Ho et al. 2020, Eq. 6-7).

    beta = 1 - a_t / a_prev
    mean = sqrt(a_prev) * beta / (1 - a_t) * x0_hat + sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x_t
    std  = sqrt((1 - a_prev) / (1 - a_t) * beta)        ("fixed_small" variance)

    The step between two arbitrary timesteps uses the same formulas with the effective beta, as
    diffusers' ``DDPMScheduler`` does for sparse timestep schedules.
    """
    pred_x0, _ = split_prediction(x_t, model_output, alpha_prod_t, prediction_type)
    a_t = _as_batch_broadcast(alpha_prod_t, x_t)
    a_prev = _as_batch_broadcast(alpha_prod_prev, x_t)
    beta = 1 - a_t / a_prev
    mean = a_prev.sqrt() * beta / (1 - a_t) * pred_x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t
    std = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=0).sqrt()
    return _finish_step(mean, std, prev_sample, generator)


def _finish_step(
    mean: Tensor,
    std: Tensor,
    prev_sample: Tensor | None,
    generator: torch.Generator | None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    std = std.expand_as(mean) if std.ndim else std.expand(mean.shape)
    if prev_sample is None and not bool(std.any()):
        prev_sample = mean  # deterministic step: nothing to draw
    elif prev_sample is None:
        if noise is None:
            where = generator.device if generator is not None else mean.device  # a host generator draws on the host
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=where).to(mean.device)
        prev_sample = mean + std * noise.to(mean.dtype)
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return prev_sample, log_prob, mean, std


def ddim_inversion_step(
    x_prev: Tensor,
    model_output: Tensor,
    alpha_prod_prev: float | Tensor,
    alpha_prod_t: float | Tensor,
    prediction_type: str = "epsilon",
) -> Tensor:
    """Deterministic DDIM inversion step x_{t_prev} -> x_t (the ODE of Eq. 13 run forwards in noise).

    ``model_output`` is the model evaluated at ``x_prev`` (the usual approximation, as in
    diffusers' ``DDIMInverseScheduler``: the noise predicted at the less noisy point is reused to
    move to the noisier one). x_t = sqrt(a_t) * x0_hat + sqrt(1 - a_t) * eps_hat.
    """
    pred_x0, pred_eps = split_prediction(x_prev, model_output, alpha_prod_prev, prediction_type)
    a_t = _as_batch_broadcast(alpha_prod_t, x_prev)
    return a_t.sqrt() * pred_x0 + (1 - a_t).sqrt() * pred_eps


def gaussian_kl_equal_std(mean_p: Tensor, mean_q: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per element, averaged over non-batch dims -> ``[B]``.

    With equal variances the KL is ||mean_p - mean_q||^2 / (2 std^2); averaging (not summing) over
    dimensions matches the log-prob convention above. ``std`` must be positive.
    """
    std = torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device)
    if std.device.type == "cpu" and bool((std <= 0).any()):  # checked where free: on a GPU the KL is inf instead
        raise ValueError("gaussian_kl_equal_std needs std > 0 (a deterministic step has no KL)")
    kl = (mean_p - mean_q) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean_p.ndim)))


def add_noise(x0: Tensor, noise: Tensor, alpha_prod_t: float | Tensor) -> Tensor:
    """Forward process sample x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a_t = _as_batch_broadcast(alpha_prod_t, x0)
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise


def training_target(x0: Tensor, noise: Tensor, alpha_prod_t: float | Tensor, prediction_type: str) -> Tensor:
    """What a model of the given parameterisation should output at x_t = add_noise(x0, noise, a_t)."""
    a_t = _as_batch_broadcast(alpha_prod_t, x0)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a_t.sqrt() * noise - (1 - a_t).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


# --------------------------------------------------------------------------- flow matching
#
# Convention (diffusers' FlowMatchEulerDiscreteScheduler, SD3, FLUX): sigma runs from 1 (noise)
# to 0 (data), x_sigma = (1 - sigma) * x_0 + sigma * noise, and the model predicts the velocity
# v = noise - x_0 = dx/dsigma. Sampling integrates from sigma = 1 down to 0, so steps have
# dt = sigma_next - sigma < 0. The model's timestep is sigma * 1000 (FLUX's transformer takes sigma).
#
# The Adjoint Matching paper (Domingo-Enrich et al. 2024) uses the opposite time: t = 0 noise,
# t = 1 data, X_t = t * x_0 + (1 - t) * noise, velocity u = dX/dt = x_0 - noise. The conversions are
# t = 1 - sigma and u = -v (see :func:`sigma_to_data_time`, :func:`velocity_to_data_time`).


def sigma_to_data_time(sigma: Tensor | float) -> Tensor | float:
    """diffusers' sigma (1 = noise) -> the Adjoint Matching paper's t (0 = noise, 1 = data)."""
    return 1 - sigma


def data_time_to_sigma(t: Tensor | float) -> Tensor | float:
    """The Adjoint Matching paper's t -> diffusers' sigma."""
    return 1 - t


def velocity_to_data_time(velocity: Tensor) -> Tensor:
    """v = noise - x_0 (per unit sigma) -> u = x_0 - noise (per unit of the paper's t): u = -v."""
    return -velocity


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching regression target v = noise - x_0."""
    return noise - x0


def flow_clean_estimate(x_t: Tensor, velocity: Tensor, sigma: float | Tensor) -> Tensor:
    """The one-step estimate of x_0 from a velocity: x_sigma - sigma v (exact for v = noise - x_0)."""
    return x_t - _as_batch_broadcast(sigma, x_t) * velocity


def flow_add_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """x_sigma = (1 - sigma) x_0 + sigma noise (``sigma`` scalar or ``[B]``)."""
    s = _as_batch_broadcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_euler_step(x: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Euler step of the probability-flow ODE: x + (sigma_next - sigma) * v (diffusers' step)."""
    dt = _as_batch_broadcast(sigma_next, x) - _as_batch_broadcast(sigma, x)
    return x + dt * velocity


# Adjoint Matching's memoryless noise schedule sigma(t) = sqrt(2 eta_t), eta_t = (1 - t) / t, is the
# SDE below with noise_level sqrt(2): then s^2 = 2 sigma / (1 - sigma) = 2 (1 - t) / t.
MEMORYLESS_NOISE_LEVEL = math.sqrt(2.0)


def memoryless_noise_std(t: Tensor | float) -> Tensor | float:
    """Adjoint Matching's memoryless diffusion coefficient sqrt(2 (1 - t) / t), paper time t."""
    if isinstance(t, Tensor):
        return (2 * (1 - t) / t).sqrt()
    return math.sqrt(2 * (1 - t) / t)


def flow_sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_max: float | Tensor | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of the marginal-preserving SDE of a flow model, with its Gaussian log-prob.

    The form of Flow-GRPO (Liu et al. 2025, Eq. 9 discretised), in diffusers' convention:

        dt   = sigma_next - sigma                       (negative)
        s    = noise_level * sqrt(sigma / (1 - sigma))  (1 - sigma_max in the denominator where sigma = 1)
        mean = x * (1 + s^2 dt / (2 sigma)) + v * (1 + s^2 (1 - sigma) / (2 sigma)) * dt
        std  = s * sqrt(-dt)

    ``noise_level = 0`` is the Euler ODE step exactly; ``noise_level = sqrt(2)`` is Adjoint
    Matching's memoryless schedule (:data:`MEMORYLESS_NOISE_LEVEL`). ``sigma_max`` is the largest
    sigma below 1 of the schedule (Flow-GRPO uses ``scheduler.sigmas[1]``); it is required when a
    ``sigma`` equals 1 and ``noise_level > 0``. Returns ``(prev_sample, log_prob, mean, std)`` like
    :func:`ddim_step`, log-prob averaged over non-batch dims.
    """
    s_t = _as_batch_broadcast(sigma, x)
    s_next = _as_batch_broadcast(sigma_next, x)
    dt = s_next - s_t
    if noise_level == 0:
        mean = flow_euler_step(x, velocity, sigma, sigma_next)
        return _finish_step(mean, torch.zeros_like(s_t), prev_sample, generator, noise)
    if sigma_max is not None:  # no host sync: sigma = 1 takes sigma_max wherever it occurs
        denominator = 1 - torch.where(s_t >= 1, _as_batch_broadcast(sigma_max, x) * torch.ones_like(s_t), s_t)
    elif bool((s_t >= 1).any()):
        raise ValueError("flow_sde_step at sigma = 1 needs sigma_max (the schedule's sigmas[1])")
    else:
        denominator = 1 - s_t
    s = noise_level * (s_t / denominator).sqrt()
    mean = x * (1 + s**2 * dt / (2 * s_t)) + velocity * (1 + s**2 * (1 - s_t) / (2 * s_t)) * dt
    std = s * (-dt).sqrt()
    return _finish_step(mean, std, prev_sample, generator, noise)


def flow_cps_step(
    x: Tensor,
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    log_prob: str = "surrogate",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Coefficients-preserving sampling (Wang and Yu 2025, "Coefficients-Preserving Sampling for
    Reinforcement Learning with Flow Matching"; flow_grpo's ``sde_type="cps"``): a stochastic step
    whose sample keeps the marginal's coefficients, (1 - sigma_next) x0 + sigma_next noise, in
    diffusers' convention (v = noise - x0):

        x0_hat = x - sigma v,   x1_hat = x + (1 - sigma) v
        std    = sigma_next sin(noise_level pi / 2)
        mean   = (1 - sigma_next) x0_hat + sigma_next cos(noise_level pi / 2) x1_hat

    so the deterministic part and the fresh noise together weigh sigma_next (no excess noise in the
    sample at high noise levels). ``noise_level = 0`` is the Euler step exactly; the step into
    sigma_next = 0 is deterministic.

    ``log_prob``: ``surrogate`` (default) is the official code's -||x_{t-1} - mean||^2, averaged over
    non-batch dims: the Gaussian's exponent without its 1 / (2 std^2) and constants, so every step
    weighs alike in the ratio (flow_grpo's CPS, Flow-Factory). ``gaussian`` is the step's true log-density;
    its 1 / (2 std^2) makes a step into a small sigma_next dominate (diffusers' flow grids end at
    sigma = 1 / 1000: the step into it has std ~1e-3 and its ratio leaves any clip range after one
    update), so use it with an SDE window away from the last steps.
    """
    s_t = _as_batch_broadcast(sigma, x)
    s_next = _as_batch_broadcast(sigma_next, x)
    x0_hat = x - s_t * velocity
    x1_hat = x + (1 - s_t) * velocity
    angle = torch.tensor(noise_level * math.pi / 2, dtype=x.dtype)
    mean = (1 - s_next) * x0_hat + s_next * torch.cos(angle) * x1_hat
    std = s_next * torch.sin(angle)
    prev_sample, density, mean, std = _finish_step(mean, std * torch.ones_like(s_t), prev_sample, generator, noise)
    if log_prob == "gaussian":
        return prev_sample, density, mean, std
    if log_prob != "surrogate":
        raise ValueError(f"unknown CPS log_prob {log_prob!r} (surrogate or gaussian)")
    return prev_sample, surrogate_log_prob(prev_sample, mean, std), mean, std


def flow_inversion_step(x: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Run the ODE backwards from sigma_next up to sigma: x + (sigma - sigma_next) * v."""
    return flow_euler_step(x, velocity, sigma_next, sigma)
