"""The memoryless SDE of a noise schedule, as Adjoint Matching (Domingo-Enrich et al., 2025)
samples and trains on it: Euler-Maruyama steps ``X_{k+1} = X_k + h_k b(X_k, t_k) + sqrt(h_k)
sigma_k eps`` on the schedule's sampling grid, in paper time t in [0, 1] (t = 1: data).

A schedule hands out its own (``NoiseSchedule.memoryless_sde``): a flow schedule the
marginal-preserving SDE of its velocity field (:class:`FlowSDE`), a diffusion schedule DDPM's step
(DDIM with eta = 1, memoryless for VP diffusion; :class:`DDPMSDE`). A method asks for one and
never branches on the family.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor


def memoryless_sigma(t: Tensor | float, offset: float = 0.0) -> Tensor | float:
    """The memoryless diffusion coefficient sqrt(2 (1 - t + offset) / (t + offset)) (paper time)."""
    if isinstance(t, Tensor):
        return (2 * (1 - t + offset) / (t + offset)).sqrt()
    return math.sqrt(2 * (1 - t + offset) / (t + offset))


def marginal_drift(u: Tensor, x: Tensor, t: float, sigma: float) -> Tensor:
    """Drift of the SDE with diffusion ``sigma`` that keeps a flow's marginals:
    ``u - sigma^2 / 2 * (x - t u) / (1 - t)`` (paper time, velocity u = dX/dt, t < 1)."""
    if sigma == 0:
        return u
    return u - 0.5 * sigma**2 * (x - t * u) / (1 - t)


class SDE(Protocol):
    """timesteps: the model timestep of each grid point k < num_steps; h[k]: the step's length
    in paper time; sigma[k]: its diffusion coefficient (0: deterministic)."""

    timesteps: Tensor
    h: list[float]
    sigma: list[float]
    num_steps: int

    def drift(self, x: Tensor, model_output: Tensor, k: int) -> Tensor:
        """b(x, t_k) from the model's output at step k."""

    def std(self, k: int) -> float:
        """sqrt(h_k) sigma_k: the standard deviation of step k's noise."""


class FlowSDE:
    """Euler-Maruyama steps of a flow schedule's marginal-preserving SDE on its sampling grid.

    ``noise_schedule``: ``memoryless`` (sigma(t)^2 = 2 (1 - t + offset h) / (t + offset h)) or
    ``constant`` (sigma(t) = ``constant_noise``: the paper's counter-example, biased).
    ``final_step``: ``sde`` keeps the noise on the last step (the paper), ``ode`` makes it
    deterministic (its control is not trained).
    """

    def __init__(self, schedule: Any, num_steps: int, noise_schedule: str = "memoryless", constant_noise: float = 1.0,
                 time_offset: float = 1.0, final_step: str = "sde"):
        timesteps, sigmas = schedule.sigmas(num_steps)
        self.timesteps = timesteps
        self.t = (1 - sigmas.double()).tolist()  # paper time of every grid point, 0 .. 1
        self.h = [self.t[k + 1] - self.t[k] for k in range(num_steps)]
        self.sigma = []
        for k in range(num_steps):
            if final_step == "ode" and k == num_steps - 1:
                self.sigma.append(0.0)
            elif noise_schedule == "memoryless":
                self.sigma.append(float(memoryless_sigma(self.t[k], time_offset * self.h[k])))
            else:
                self.sigma.append(float(constant_noise))
        self.num_steps = num_steps

    def drift(self, x: Tensor, model_output: Tensor, k: int) -> Tensor:
        """b(x, t_k) from the model's velocity (diffusers' v = -u)."""
        u = -model_output.float()
        return marginal_drift(u, x.float(), self.t[k], self.sigma[k])

    def std(self, k: int) -> float:
        return math.sqrt(self.h[k]) * self.sigma[k]


class DDPMSDE:
    """The DDPM step (DDIM with eta = 1, memoryless for VP diffusion) of an epsilon / v schedule,
    read as an Euler-Maruyama step: drift = (mean - x) / h, sigma = std / sqrt(h), h the step's
    share of the training timesteps (paper time t = 1 - timestep / T)."""

    def __init__(self, schedule: Any, num_steps: int):
        self.schedule = schedule
        self.timesteps = schedule.timesteps(num_steps)
        self.h = [float(schedule.step_length(t, num_steps)) for t in self.timesteps]
        self.num_steps = num_steps
        ones = torch.ones(1, 1)
        self.sigma = []
        for k, t in enumerate(self.timesteps):
            std = schedule.step(ones, torch.zeros_like(ones), t, num_steps, eta=1.0).std
            self.sigma.append(float(std.reshape(-1)[0]) / math.sqrt(self.h[k]))

    def drift(self, x: Tensor, model_output: Tensor, k: int) -> Tensor:
        x32 = x.float()  # prev_sample given: the step draws no noise it would not use
        step = self.schedule.step(x32, model_output.float(), self.timesteps[k], self.num_steps, eta=1.0, prev_sample=x32)
        return (step.mean - x32) / self.h[k]

    def std(self, k: int) -> float:
        return math.sqrt(self.h[k]) * self.sigma[k]
