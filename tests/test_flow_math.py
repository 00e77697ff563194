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


# ------------------------------------------------------------------ CPS (coefficients-preserving sampling)


def test_cps_step_by_hand():
    """x = 1, v = 0.5, sigma 0.6 -> 0.3, noise level 0.5 (angle pi/4): x0_hat = 0.7, x1_hat = 1.2,
    mean = 0.7 * 0.7 + 0.3 cos(pi/4) 1.2, std = 0.3 sin(pi/4); noise level 0 is the Euler step."""
    x, v = torch.ones(1, 1), torch.full((1, 1), 0.5)
    prev, log_prob, mean, std = sampling.flow_cps_step(x, v, 0.6, 0.3, 0.5, noise=torch.zeros(1, 1))
    r = math.sqrt(0.5)
    assert mean.item() == pytest.approx(0.49 + 0.3 * r * 1.2, abs=1e-6)
    assert std.item() == pytest.approx(0.3 * r, abs=1e-6) and prev.item() == pytest.approx(mean.item())
    assert log_prob.item() == 0  # the official surrogate -(x - mean)^2 at the mean
    # with noise 2: x - mean = 2 std; the surrogate is -(2 std)^2, the true density
    # log N = -(2 std)^2 / (2 std^2) - log(std) - log(sqrt(2 pi)) = -2 - log(std) - log(sqrt(2 pi))
    noisy = sampling.flow_cps_step(x, v, 0.6, 0.3, 0.5, noise=torch.full((1, 1), 2.0))
    assert noisy[1].item() == pytest.approx(-(2 * 0.3 * r) ** 2, abs=1e-6)
    true = sampling.flow_cps_step(x, v, 0.6, 0.3, 0.5, noise=torch.full((1, 1), 2.0), log_prob="gaussian")
    assert true[1].item() == pytest.approx(-2 - math.log(0.3 * r) - 0.5 * math.log(2 * math.pi), abs=1e-5)
    assert true[0].item() == noisy[0].item()
    euler = sampling.flow_cps_step(x, v, 0.6, 0.3, 0.0)[0]
    assert euler.item() == pytest.approx(1 + 0.5 * (0.3 - 0.6), abs=1e-6)
    last = sampling.flow_cps_step(x, v, 0.3, 0.0, 0.8)  # into sigma = 0: deterministic, the clean estimate
    assert last[3].abs().max().item() == 0 and last[0].item() == pytest.approx(1 - 0.3 * 0.5, abs=1e-6)


def test_cps_keeps_the_marginals_coefficients():
    """With the exact velocity (v = n - x0 at x = (1 - sigma) x0 + sigma n) a CPS sample is
    (1 - sigma') x0 plus noise of std sigma' whatever the noise level (the plain flow SDE's sample
    has more: the noisy images CPS removes)."""
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(20000, 1, generator=g), torch.randn(20000, 1, generator=g)
    sigma, sigma_next = 0.9, 0.6
    x = (1 - sigma) * x0 + sigma * n
    for level in (0.3, 0.8, 1.0):
        prev = sampling.flow_cps_step(x, n - x0, sigma, sigma_next, level, generator=g)[0]
        residual = prev - (1 - sigma_next) * x0
        assert residual.std().item() == pytest.approx(sigma_next, rel=0.02)
    sde = sampling.flow_sde_step(x, n - x0, sigma, sigma_next, 0.7, generator=g)[0]
    assert (sde - (1 - sigma_next) * x0).std().item() > 1.05 * sigma_next


def test_schedules_step_with_cps_and_refuse_it_where_it_does_not_apply(tiny_models):
    """A CPS rollout's log-probs are recomputed by log_probs_of (its trajectory remembers the sde);
    a diffusion schedule refuses cps."""
    from genalign.core.experiment import BackboneConfig
    from genalign.core.rollout import rollout
    from genalign.core.sampler import log_probs_of
    from genalign.pipelines import load_backbone

    flow = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="none"), "cpu")
    r = rollout(flow, ["a red circle"], 4, 1.0, 0.8, generator=torch.Generator().manual_seed(0), sde="cps")
    assert r.trajectory.sde == "cps" and r.stochastic_steps == [0, 1, 2]
    with torch.no_grad():
        again = log_probs_of(flow, r.trajectory, [0, 1, 2])
    torch.testing.assert_close(again, r.trajectory.log_probs[:, :3], rtol=1e-4, atol=1e-4)
    # cps_gaussian: the same images, the log-probs the true densities of the same steps
    g = rollout(flow, ["a red circle"], 4, 1.0, 0.8, generator=torch.Generator().manual_seed(0), sde="cps_gaussian")
    torch.testing.assert_close(g.images, r.images)
    sigmas = flow.schedule.sigmas(4)[1]
    for step in range(3):  # density = surrogate / (2 std^2) - log std - log sqrt(2 pi), std = sigma' sin(0.4 pi)
        std = float(sigmas[step + 1]) * math.sin(0.8 * math.pi / 2)
        by_hand = r.trajectory.log_probs[:, step] / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(g.trajectory.log_probs[:, step], by_hand, rtol=1e-4, atol=1e-4)
    plain = rollout(flow, ["a red circle"], 4, 1.0, 0.8, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(plain.images, r.images)
    sd = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="none"), "cpu")
    with pytest.raises(ValueError, match="flow-model sampler"):
        rollout(sd, ["a red circle"], 2, 1.0, 1.0, sde="cps")


@pytest.mark.parametrize("sde", ["default", "cps", "cps_gaussian"])
def test_low_precision_steps_log_the_probability_training_recomputes(tiny_models, sde):
    """bf16 latents: the log-prob a sampling step records (of the sample as rounded to bf16) is the
    one the training pass recomputes from that sample, for each kind of stochastic step (with CPS's
    surrogate the rounding must not switch it to the Gaussian density)."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone

    schedule = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="none"), "cpu").schedule
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16)
    v = torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16)
    t = schedule.timesteps(4)[1]
    sampled = schedule.step(x, v, t, 4, 0.8, generator=g, sde=sde)
    again = schedule.step(x, v, t, 4, 0.8, prev_sample=sampled.prev_sample, sde=sde)
    assert sampled.prev_sample.dtype == torch.bfloat16
    torch.testing.assert_close(sampled.log_prob, again.log_prob, rtol=1e-5, atol=1e-6)
