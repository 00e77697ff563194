"""Flow-matching sampling math against diffusers and torch.distributions, and on an exact 1-D toy."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genalign.core import sampling


def test_noise_level_zero_is_diffusers_flow_euler_step_exactly():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for i in (0, 4, 9):
        x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = scheduler.step(v, scheduler.timesteps[i], x).prev_sample
        scheduler._step_index = None  # step() advances an internal index; look the timestep up again
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        prev, log_prob, mean, std = sampling.flow_sde_step(x, v, sigma, sigma_next, 0.0)
        assert torch.equal(prev, expected) and torch.equal(mean, expected)
        assert torch.all(std == 0) and torch.all(log_prob == 0)
        assert torch.equal(sampling.flow_euler_step(x, v, sigma, sigma_next), expected)


def test_sde_step_mean_std_by_hand_and_log_prob_against_normal():
    # sigma = 0.5, sigma_next = 0.4, noise_level 1: s^2 = 1, dt = -0.1
    # mean = x (1 - 0.1) + v (1 + 0.5) (-0.1) = 0.9 x - 0.15 v; std = sqrt(0.1)
    x, v = torch.full((1, 1), 2.0), torch.full((1, 1), 1.0)
    prev, log_prob, mean, std = sampling.flow_sde_step(x, v, 0.5, 0.4, 1.0, generator=torch.Generator().manual_seed(1))
    assert mean.item() == pytest.approx(0.9 * 2 - 0.15)
    assert std.item() == pytest.approx(math.sqrt(0.1))
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean()
    assert log_prob.item() == pytest.approx(expected.item(), abs=1e-6)
    g = torch.Generator().manual_seed(2)
    xs, vs, given = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.9, 0.5, 0.2])
    out, lp, m, sd = sampling.flow_sde_step(xs, vs, sigmas, sigmas - 0.1, 0.7, prev_sample=given)
    assert out is given
    torch.testing.assert_close(lp, torch.distributions.Normal(m, sd).log_prob(given).mean(dim=(1, 2, 3)))


def test_sigma_one_needs_sigma_max_which_replaces_it_in_the_denominator():
    x, v = torch.zeros(1, 1), torch.zeros(1, 1)
    with pytest.raises(ValueError, match="sigma_max"):
        sampling.flow_sde_step(x, v, 1.0, 0.9, 0.7)
    _, _, _, std = sampling.flow_sde_step(x, v, 1.0, 0.9, 0.7, sigma_max=0.9)
    assert std.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1))


def test_memoryless_level_matches_adjoint_matching_sigma_and_drift():
    """noise_level sqrt(2): s^2 = 2 sigma / (1 - sigma) = 2 (1 - t) / t = sigma(t)^2, and the mean
    is the paper's Euler-Maruyama drift x + h (2 u - x / t) with h = -dt, u = -v."""
    sigma, sigma_next = 0.6, 0.55
    t, h = sampling.sigma_to_data_time(sigma), sigma - sigma_next
    x, v = torch.full((1, 1), 0.3), torch.full((1, 1), -1.2)
    _, _, mean, std = sampling.flow_sde_step(x, v, sigma, sigma_next, sampling.MEMORYLESS_NOISE_LEVEL)
    u = sampling.velocity_to_data_time(v)
    assert mean.item() == pytest.approx((x + h * (2 * u - x / t)).item(), rel=1e-6)
    assert std.item() == pytest.approx(sampling.memoryless_noise_std(t) * math.sqrt(h), rel=1e-6)
    assert sampling.data_time_to_sigma(t) == pytest.approx(sigma)


def _gaussian_velocity(x, sigma, m, s0):
    """Exact v(x, sigma) = E[noise - x0 | x_sigma] for x0 ~ N(m, s0^2), noise ~ N(0, 1)."""
    var = (1 - sigma) ** 2 * s0**2 + sigma**2
    return -m + (sigma - (1 - sigma) * s0**2) / var * (x - (1 - sigma) * m)


@pytest.mark.parametrize("noise_level", [0.0, 0.7, math.sqrt(2)])
def test_sde_preserves_the_marginals_of_the_ode_on_a_gaussian_toy(noise_level):
    m, s0, n, steps = 1.5, 0.5, 40_000, 200
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = _gaussian_velocity(x, sigma, m, s0)
        x = sampling.flow_sde_step(x, v, sigma, sigma_next, noise_level, generator=g, sigma_max=sigmas[1])[0]
        if i in (steps // 2,):  # halfway, the marginal of x_sigma is N((1 - sigma) m, var(sigma))
            s = float(sigma_next)
            assert x.mean().item() == pytest.approx((1 - s) * m, abs=0.03)
            assert x.var().item() == pytest.approx((1 - s) ** 2 * s0**2 + s**2, rel=0.05)
    assert x.mean().item() == pytest.approx(m, abs=0.03)
    assert x.std().item() == pytest.approx(s0, rel=0.05)


def test_flow_inversion_round_trip_with_the_exact_velocity():
    m, s0 = 0.5, 0.8
    x0 = torch.tensor([[-0.4], [0.9], [1.7]], dtype=torch.float64)

    def round_trip(steps):
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        x = x0
        for i in reversed(range(steps)):  # data -> noise
            x = sampling.flow_inversion_step(x, _gaussian_velocity(x, sigmas[i + 1], m, s0), sigmas[i], sigmas[i + 1])
        noise = x
        for i in range(steps):  # noise -> data
            x = sampling.flow_euler_step(x, _gaussian_velocity(x, sigmas[i], m, s0), sigmas[i], sigmas[i + 1])
        return (x - x0).abs().max().item(), noise

    error_100, noise = round_trip(100)
    error_400, _ = round_trip(400)
    assert error_100 < 0.05  # measured 0.031: first-order Euler both ways
    assert error_400 < 0.35 * error_100  # and it shrinks like the step size
    assert (noise - x0).abs().min() > 0.1  # it really went somewhere else


def test_flow_noising_and_target():
    x0, noise = torch.full((2, 1), 2.0), torch.full((2, 1), -1.0)
    xs = sampling.flow_add_noise(x0, noise, torch.tensor([0.25, 1.0]))
    assert xs.flatten().tolist() == [0.75 * 2 - 0.25, -1.0]
    assert sampling.flow_target(x0, noise).flatten().tolist() == [-3.0, -3.0]
