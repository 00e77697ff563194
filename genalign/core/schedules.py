"""Noise schedules: the object a backbone hands to the generic sampler.

A schedule knows the timesteps of an N-step sampling run and how to take one step between two of
them, so that the sampler and the fine-tuners never branch on the model family. The
variance-preserving schedule here serves the Stable Diffusion family (epsilon and v-prediction);
flow-matching schedules implement the same methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from genalign.core import sampling


@dataclass(frozen=True)
class StepResult:
    prev_sample: Tensor  # (B, C, H, W)
    log_prob: Tensor  # (B,)
    mean: Tensor  # (B, C, H, W)
    std: Tensor  # broadcastable to (B, C, H, W)


class NoiseSchedule(Protocol):
    """What the sampler and the fine-tuners need from a model's noise process."""

    prediction_type: str
    num_train_timesteps: int

    def timesteps(self, num_steps: int) -> Tensor:
        """Model timesteps of an N-step sampling run, noisiest first, shape (N,)."""

    def step_length(self, timestep: Tensor, num_steps: int) -> Tensor:
        """The length of the reverse step from ``timestep`` in paper time, |t - t_next| / T (float64)."""

    def alpha_prod(self, timestep: Tensor) -> Tensor | None:
        """alphabar_t of a variance-preserving diffusion schedule at ``timestep``; None for a
        schedule without one (flow)."""

    def memoryless_sde(self, num_steps: int, **options: Any) -> Any:
        """The memoryless SDE on this schedule's N-step grid (``genalign.core.sde``); ``options``
        are a flow SDE's (noise_schedule, constant_noise, time_offset, final_step)."""

    def step(
        self,
        x_t: Tensor,
        model_output: Tensor,
        timestep: Tensor,
        num_steps: int,
        eta: float,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        sde: str = "default",
    ) -> StepResult:
        """One reverse step from ``timestep`` to the next timestep of an N-step run.

        The new sample is ``prev_sample`` if given, else mean + std * ``noise`` (or a draw from
        ``generator``); ``log_prob`` is the density of the sample as returned (in its dtype).
        ``sde``: the form of a stochastic step (``cps``: a flow model's coefficients-preserving step
        with the official surrogate log-prob; ``cps_gaussian``: with its true density).
        """

    def invert_step(self, x_prev: Tensor, model_output: Tensor, timestep: Tensor, num_steps: int) -> Tensor:
        """Deterministic inversion from the step after ``timestep`` up to ``timestep``."""

    def previous_timestep(self, timestep: Tensor, num_steps: int) -> Tensor:
        """The timestep a reverse step from ``timestep`` lands on."""

    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        """Forward-noise clean latents to ``timestep`` (``[B]`` or scalar)."""

    def clean_estimate(self, x_t: Tensor, model_output: Tensor, timestep: Tensor) -> Tensor:
        """The one-step (Tweedie) estimate of the clean latents from a model output at ``timestep``."""

    def training_target(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        """What the model should predict at ``add_noise(x0, noise, timestep)``."""

    def sample_training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform training timesteps, shape (B,)."""


def _in_dtype(step: StepResult, dtype: torch.dtype, given: Tensor | None,
              log_prob_of: Callable[[Tensor, Tensor, Tensor], Tensor] = sampling.gaussian_log_prob) -> StepResult:
    """Cast an fp32 step to the latents' dtype; the log-prob (``log_prob_of``: the one the step
    computed, Gaussian or CPS's surrogate) is of the sample as rounded."""
    if dtype == torch.float32:
        return step
    if given is not None:
        return StepResult(given, step.log_prob, step.mean.to(dtype), step.std.to(dtype))
    prev = step.prev_sample.to(dtype)
    log_prob = log_prob_of(prev.float(), step.mean, step.std)
    return StepResult(prev, log_prob, step.mean.to(dtype), step.std.to(dtype))


class DiffusionSchedule:
    """Variance-preserving discrete schedule (DDPM/DDIM) with diffusers' timestep conventions.

    Timestep placement (``leading``/``trailing``/``linspace`` spacing, ``steps_offset``) is taken
    from diffusers' own ``DDIMScheduler.set_timesteps`` so that our sampler visits exactly the
    timesteps a diffusers pipeline visits; the step size rule ``t_prev = t - T // N`` is also
    diffusers' (``scheduling_ddim.py``). The last step lands on ``final_alpha_cumprod`` (1.0 when
    ``set_alpha_to_one``, else ``alphas_cumprod[0]``).
    """

    def __init__(self, scheduler_config: dict[str, Any] | Any, timestep_spacing: str | None = None):
        from diffusers import DDIMScheduler

        config = dict(scheduler_config)
        config.pop("_class_name", None)
        config.pop("_diffusers_version", None)
        if timestep_spacing is not None:
            config["timestep_spacing"] = timestep_spacing
        class_name = dict(scheduler_config).get("_class_name", "")
        if class_name not in ("DDIMScheduler", "PNDMScheduler") or "set_alpha_to_one" not in config:
            # Euler/DPM-type schedulers (SD-Turbo, SDXL-Turbo ship Euler) end at sigma = 0, i.e.
            # alpha_prod = 1, whatever a leftover set_alpha_to_one key in their config says.
            config["set_alpha_to_one"] = True
        self._ddim = DDIMScheduler.from_config(config)
        self.prediction_type: str = self._ddim.config.prediction_type
        if self.prediction_type not in sampling.PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config")
        self.num_train_timesteps: int = self._ddim.config.num_train_timesteps
        self.timestep_spacing: str = self._ddim.config.timestep_spacing
        self.alphas_cumprod: Tensor = self._ddim.alphas_cumprod.to(torch.float64)
        self.final_alpha_cumprod: float = float(self._ddim.final_alpha_cumprod)
        self._tables: dict[torch.device, Tensor] = {}  # alphas_cumprod on each device it was looked up on

    def timesteps(self, num_steps: int) -> Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self._ddim.set_timesteps(num_steps)
        return self._ddim.timesteps.clone()

    def previous_timestep(self, timestep: Tensor, num_steps: int) -> Tensor:
        return timestep - self.num_train_timesteps // num_steps

    def step_length(self, timestep: Tensor, num_steps: int) -> Tensor:
        t = torch.as_tensor(timestep).double()
        t_next = torch.as_tensor(self.previous_timestep(timestep, num_steps)).double().to(t.device)
        return (t - t_next).abs() / self.num_train_timesteps

    def memoryless_sde(self, num_steps: int, **options: Any) -> Any:
        """DDPM's step (:class:`~genalign.core.sde.DDPMSDE`); the flow SDE's options do not apply."""
        from genalign.core.config import ConfigError
        from genalign.core.sde import DDPMSDE

        if options.get("noise_schedule", "memoryless") != "memoryless":
            raise ConfigError("noise_schedule: constant is only defined for flow backbones (diffusion uses DDPM)")
        unused = [name for name in options if name != "noise_schedule"]
        if unused:
            raise ConfigError(f"{', '.join(unused)} shape the flow SDE and do nothing on a diffusion backbone (its "
                              "memoryless SDE is DDPM's); remove them")
        return DDPMSDE(self, num_steps)

    def alpha_prod(self, timestep: Tensor) -> Tensor:
        """alpha_prod at integer timesteps, on their device (a lookup there: no host sync);
        negative timesteps mean the end of the chain."""
        timestep = torch.as_tensor(timestep)
        table = self._tables.get(timestep.device)
        if table is None:  # float64 where the device has it (MPS has not)
            dtype = torch.float32 if timestep.device.type == "mps" else torch.float64
            table = self._tables[timestep.device] = self.alphas_cumprod.to(timestep.device, dtype)
        values = table[timestep.clamp(min=0).long()]
        return torch.where(timestep < 0, torch.full_like(values, self.final_alpha_cumprod), values)

    def _alphas(self, timestep: Tensor, num_steps: int, like: Tensor) -> tuple[Tensor, Tensor]:
        a_t = self.alpha_prod(timestep).to(like.device, like.dtype)
        a_prev = self.alpha_prod(self.previous_timestep(timestep, num_steps)).to(like.device, like.dtype)
        return a_t, a_prev

    def step(
        self,
        x_t: Tensor,
        model_output: Tensor,
        timestep: Tensor,
        num_steps: int,
        eta: float,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        sde: str = "default",
    ) -> StepResult:
        if sde != "default":
            raise ValueError(f"sde {sde!r} is a flow-model sampler; a diffusion schedule steps with DDIM's eta")
        # The step math runs in fp32 whatever the latents' dtype: in bf16, alpha_prod = 0.99915
        # rounds to 1 and the step divides by zero. Results come back in the latents' dtype.
        x32 = x_t.float()
        a_t, a_prev = self._alphas(timestep, num_steps, x32)
        prev32 = None if prev_sample is None else prev_sample.float()
        noise32 = None if noise is None else noise.float()
        prev, log_prob, mean, std = sampling.ddim_step(
            x32, model_output.float(), a_t, a_prev, eta, prev32, generator, self.prediction_type, noise32
        )
        return _in_dtype(StepResult(prev, log_prob, mean, std), x_t.dtype, given=prev_sample)

    def invert_step(self, x_prev: Tensor, model_output: Tensor, timestep: Tensor, num_steps: int) -> Tensor:
        x32 = x_prev.float()
        a_t, a_prev = self._alphas(timestep, num_steps, x32)
        return sampling.ddim_inversion_step(x32, model_output.float(), a_prev, a_t, self.prediction_type).to(x_prev.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        a_t = self.alpha_prod(timestep).to(x0.device, torch.float32)
        return sampling.add_noise(x0.float(), noise.float(), a_t).to(x0.dtype)

    def clean_estimate(self, x_t: Tensor, model_output: Tensor, timestep: Tensor) -> Tensor:
        a_t = self.alpha_prod(timestep).to(x_t.device, torch.float32)
        return sampling.split_prediction(x_t.float(), model_output.float(), a_t, self.prediction_type)[0]

    def training_target(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        a_t = self.alpha_prod(timestep).to(x0.device, torch.float32)
        return sampling.training_target(x0.float(), noise.float(), a_t, self.prediction_type).to(x0.dtype)

    def sample_training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)


class FlowSchedule:
    """Rectified-flow / flow-matching schedule (SD3, FLUX) with diffusers' sigma placement.

    Sigmas (and the model timesteps ``sigma * 1000``) come from diffusers' own
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` with the checkpoint's config (static ``shift``
    for SD3; ``mu`` dynamic shifting and ``linspace(1, 1/N, N)`` sigmas as the FLUX pipeline passes
    them). Steps are :func:`~genalign.core.sampling.flow_sde_step`, whose ``noise_level`` is the
    sampler's ``eta`` (0: the Euler ODE, sqrt(2): Adjoint Matching's memoryless SDE).
    """

    prediction_type = "flow"

    def __init__(
        self,
        scheduler_config: dict[str, Any] | Any,
        mu: float | Callable[[int], float] | None = None,
        linspace_sigmas: bool = False,
        logit_normal: tuple[float, float] = (0.0, 1.0),
        training_mu_steps: int = 50,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(scheduler_config)
        config.pop("_class_name", None)
        config.pop("_diffusers_version", None)
        self._scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        self.num_train_timesteps: int = self._scheduler.config.num_train_timesteps
        self.shift: float = float(self._scheduler.config.shift)
        self.mu = mu  # a function of the step count where the shift depends on it (FLUX.2's empirical mu)
        self.training_mu_steps = training_mu_steps  # such a mu's step count for training timesteps
        self.linspace_sigmas = linspace_sigmas
        self.logit_normal = logit_normal
        if self._scheduler.config.use_dynamic_shifting and mu is None:
            raise ValueError("this flow scheduler uses dynamic shifting: give mu (FLUX: from the image size)")
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def sigmas(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """(timesteps (N,), sigmas (N+1,) ending at 0) of an N-step run, both float32."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps not in self._cache:
            import numpy as np

            custom = np.linspace(1.0, 1 / num_steps, num_steps) if self.linspace_sigmas else None
            self._scheduler.set_timesteps(num_steps, sigmas=custom, mu=self.mu_at(num_steps))
            self._cache[num_steps] = (self._scheduler.timesteps.clone().float(), self._scheduler.sigmas.clone().float())
        return self._cache[num_steps]

    def timesteps(self, num_steps: int) -> Tensor:
        return self.sigmas(num_steps)[0].clone()

    def mu_at(self, num_steps: int) -> float | None:
        """The dynamic shift's mu for an ``num_steps``-step run (None: a static shift)."""
        return self.mu(num_steps) if callable(self.mu) else self.mu

    def _index(self, timestep: Tensor, num_steps: int) -> Tensor:
        """Schedule index of each timestep (scalar -> 0-d, [B] -> [B]); the smallest gap between
        two timesteps of a schedule is far above the tolerance (0.32 at 1000 steps)."""
        timesteps = self.sigmas(num_steps)[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).cpu()
        distance = (t.reshape(-1, 1) - timesteps.reshape(1, -1)).abs()  # (B, N)
        nearest = distance.argmin(dim=1)
        off = distance.gather(1, nearest[:, None]).squeeze(1) >= 1e-3
        if bool(off.any()):
            raise ValueError(f"timestep {float(t.reshape(-1)[off][0])} is not on the {num_steps}-step schedule")
        return nearest.reshape(t.shape)

    def _sigma_pair(self, timestep: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
        i = self._index(timestep, num_steps)
        sigmas = self.sigmas(num_steps)[1]
        return sigmas[i], sigmas[i + 1]

    def previous_timestep(self, timestep: Tensor, num_steps: int) -> Tensor:
        return self._sigma_pair(timestep, num_steps)[1] * self.num_train_timesteps

    def step_length(self, timestep: Tensor, num_steps: int) -> Tensor:
        t = torch.as_tensor(timestep).double()
        t_next = torch.as_tensor(self.previous_timestep(timestep, num_steps)).double().to(t.device)
        return (t - t_next).abs() / self.num_train_timesteps

    def alpha_prod(self, timestep: Tensor) -> None:
        """A flow schedule has no alphabar."""
        return None

    def memoryless_sde(self, num_steps: int, **options: Any) -> Any:
        """The marginal-preserving SDE of the velocity field (:class:`~genalign.core.sde.FlowSDE`)."""
        from genalign.core.sde import FlowSDE

        return FlowSDE(self, num_steps, **options)

    def step(
        self,
        x_t: Tensor,
        model_output: Tensor,
        timestep: Tensor,
        num_steps: int,
        eta: float,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        sde: str = "default",
    ) -> StepResult:
        sigma, sigma_next = self._sigma_pair(timestep, num_steps)
        if eta > 0 and num_steps == 1:
            raise ValueError("a 1-step flow schedule has no room for SDE noise: sample it with eta = 0")
        # The step into sigma = 0 is the ODE step (no noise is left to add on clean data; FLUX's
        # linspace(1, 1/N) schedules would otherwise leave the last sigma's noise in the image).
        if bool((sigma_next == 0).all()):
            eta = 0.0
        prev32 = None if prev_sample is None else prev_sample.float()
        noise32 = None if noise is None else noise.float()
        if sde in ("cps", "cps_gaussian"):
            out = sampling.flow_cps_step(x_t.float(), model_output.float(), sigma.to(x_t.device),
                                         sigma_next.to(x_t.device), eta, prev32, generator, noise32,
                                         log_prob="gaussian" if sde == "cps_gaussian" else "surrogate")
            surrogate = sde == "cps"
            return _in_dtype(StepResult(*out), x_t.dtype, given=prev_sample,
                             log_prob_of=sampling.surrogate_log_prob if surrogate else sampling.gaussian_log_prob)
        if sde != "default":
            raise ValueError(f"unknown flow sde {sde!r} (default, cps or cps_gaussian)")
        sigma_max = self.sigmas(num_steps)[1][1]
        out = sampling.flow_sde_step(
            x_t.float(), model_output.float(), sigma.to(x_t.device), sigma_next.to(x_t.device), eta, prev32,
            generator, sigma_max, noise32,
        )
        return _in_dtype(StepResult(*out), x_t.dtype, given=prev_sample)

    def invert_step(self, x_prev: Tensor, model_output: Tensor, timestep: Tensor, num_steps: int) -> Tensor:
        sigma, sigma_next = self._sigma_pair(timestep, num_steps)
        x32 = x_prev.float()
        return sampling.flow_inversion_step(
            x32, model_output.float(), sigma.to(x32.device), sigma_next.to(x32.device)
        ).to(x_prev.dtype)

    def _sigma(self, timestep: Tensor, like: Tensor) -> Tensor:
        return (torch.as_tensor(timestep, dtype=torch.float32) / self.num_train_timesteps).to(like.device)

    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        return sampling.flow_add_noise(x0.float(), noise.float(), self._sigma(timestep, x0)).to(x0.dtype)

    def clean_estimate(self, x_t: Tensor, model_output: Tensor, timestep: Tensor) -> Tensor:
        return sampling.flow_clean_estimate(x_t.float(), model_output.float(), self._sigma(timestep, x_t))

    def training_target(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        return sampling.flow_target(x0.float(), noise.float()).to(x0.dtype)

    def sample_training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Logit-normal sigmas (SD3 paper, Sec. 3.1; mean 0, std 1 by default), shifted as the
        sampling schedule is (static ``shift``, or FLUX's ``mu`` time shift, i.e. a shift of
        exp(mu), when the config uses dynamic shifting; a step-dependent mu at ``training_mu_steps``,
        the pipeline's default step count), as model timesteps ``sigma * 1000``."""
        mean, std = self.logit_normal
        u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
        if self._scheduler.config.use_dynamic_shifting:
            sigma = self._scheduler.time_shift(self.mu_at(self.training_mu_steps), 1.0, u)
        else:
            sigma = self.shift * u / (1 + (self.shift - 1) * u)
        return sigma * self.num_train_timesteps
