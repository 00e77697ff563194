"""The pure sampling math against torch.distributions and diffusers' schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from genalign.core import sampling

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1)


def test_gaussian_log_prob_is_the_normal_density_averaged_over_dims():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    std = torch.rand(3, 1, 1, 1, generator=g) + 0.1
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3))
    got = sampling.gaussian_log_prob(x, mean, std)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected)


def test_gaussian_log_prob_by_hand():
    # x = 1, mean = 0, std = 2: -1/8 - log 2 - log sqrt(2 pi) = -1.737085...
    got = sampling.gaussian_log_prob(torch.ones(1, 1), torch.zeros(1, 1), 2.0)
    assert got.item() == pytest.approx(-0.125 - math.log(2) - 0.5 * math.log(2 * math.pi), abs=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta0_mean_equals_diffusers_ddim_step(prediction_type):
    scheduler = DDIMScheduler(**SD15, prediction_type=prediction_type)
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps[[0, 10, 25, 49]]:
        x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        out = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        expected = scheduler.step(out, t, x, eta=0.0).prev_sample
        prev_t = t - 1000 // 50
        a_t = scheduler.alphas_cumprod[t].double()
        a_prev = scheduler.alphas_cumprod[prev_t].double() if prev_t >= 0 else scheduler.final_alpha_cumprod.double()
        sample, log_prob, mean, std = sampling.ddim_step(x, out, a_t, a_prev, 0.0, prediction_type=prediction_type)
        torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sample, mean)  # deterministic: nothing drawn
        assert torch.all(std == 0) and torch.all(log_prob == 0)


def test_ddim_eta1_step_matches_diffusers_noise_and_log_prob():
    scheduler = DDIMScheduler(**SD15)
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[5]
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a_t, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 50]
    prev, log_prob, mean, std = sampling.ddim_step(x, out, a_t, a_prev, 1.0, generator=torch.Generator().manual_seed(3))
    # diffusers adds std * noise to the same mean (its variance formula, eta = 1)
    expected_std = (scheduler._get_variance(t, t - 50)) ** 0.5
    torch.testing.assert_close(std, torch.full_like(std, float(expected_std)))
    ref = scheduler.step(out, t, x, eta=1.0, variance_noise=(prev - mean) / std).prev_sample
    torch.testing.assert_close(prev, ref, rtol=1e-5, atol=1e-5)
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected)


def test_given_prev_sample_is_returned_and_scored():
    g = torch.Generator().manual_seed(4)
    x, out, prev = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    sample, log_prob, mean, std = sampling.ddim_step(x, out, 0.5, 0.7, 0.8, prev_sample=prev)
    assert sample is prev
    torch.testing.assert_close(log_prob, torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3)))


def test_per_sample_alphas_broadcast_like_scalars():
    g = torch.Generator().manual_seed(5)
    x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    a_t, a_prev = torch.tensor([0.3, 0.6]), torch.tensor([0.5, 0.8])
    mean = sampling.ddim_step(x, out, a_t, a_prev, 0.0)[2]
    for i in range(2):
        single = sampling.ddim_step(x[i : i + 1], out[i : i + 1], a_t[i], a_prev[i], 0.0)[2]
        torch.testing.assert_close(mean[i : i + 1], single)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_step_is_ddim_with_eta_one_and_matches_diffusers_mean(prediction_type):
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(6)
    t = 600  # full 1000-step schedule: t_prev = t - 1
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a_t, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 1]
    _, _, mean, std = sampling.ddpm_step(x, out, a_t, a_prev, prediction_type=prediction_type)
    _, _, ddim_mean, ddim_std = sampling.ddim_step(x, out, a_t, a_prev, 1.0, prediction_type=prediction_type)
    torch.testing.assert_close(mean, ddim_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, ddim_std)
    # diffusers' DDPM: prev = mean + std * noise; recover its mean with zero-variance noise via two seeds
    s1 = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s1, mean + std * noise, rtol=1e-5, atol=1e-5)


def test_gaussian_kl_equal_std_matches_torch_distributions():
    g = torch.Generator().manual_seed(7)
    mp, mq = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = 0.3
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, std), torch.distributions.Normal(mq, std)
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(sampling.gaussian_kl_equal_std(mp, mq, std), expected)
    # by hand: means 1 apart, std 1 -> 1/2
    assert sampling.gaussian_kl_equal_std(torch.ones(1, 1), torch.zeros(1, 1), 1.0).item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        sampling.gaussian_kl_equal_std(mp, mq, 0.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_inversion_step_inverts_ddim_step_for_an_exact_model(prediction_type):
    """With the true noise of a fixed x0 as model output, DDIM and its inversion are exact inverses."""
    g = torch.Generator().manual_seed(8)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    a_prev, a_t = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    x_prev = sampling.add_noise(x0, eps, a_prev)
    target_prev = sampling.training_target(x0, eps, a_prev, prediction_type)
    x_t = sampling.ddim_inversion_step(x_prev, target_prev, a_prev, a_t, prediction_type)
    torch.testing.assert_close(x_t, sampling.add_noise(x0, eps, a_t))
    target_t = sampling.training_target(x0, eps, a_t, prediction_type)
    back = sampling.ddim_step(x_t, target_t, a_t, a_prev, 0.0, prediction_type=prediction_type)[0]
    torch.testing.assert_close(back, x_prev)


def test_training_target_v_by_hand():
    # a = 0.64: v = 0.8 * eps - 0.6 * x0; with eps = 1, x0 = 2 -> -0.4
    v = sampling.training_target(torch.full((1, 1), 2.0), torch.ones(1, 1), 0.64, "v_prediction")
    assert v.item() == pytest.approx(-0.4)


def test_unknown_prediction_type_is_an_error():
    with pytest.raises(ValueError, match="prediction_type"):
        sampling.ddim_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.6, 0.0, prediction_type="flow")


def test_conditioning_select_with_a_boolean_mask_keeps_prompts_aligned():
    from genalign.core.types import Conditioning

    cond = Conditioning({"e": torch.arange(3).view(3, 1)}, None, ["a", "b", "c"])
    picked = cond.select(torch.tensor([False, False, True]))
    assert picked.prompts == ["c"] and picked.positive["e"].tolist() == [[2]]
    assert cond.select([2, 0]).prompts == ["c", "a"]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow"])
def test_clean_estimate_of_the_exact_target_is_the_clean_sample(kind):
    """schedule.clean_estimate inverts add_noise given the exact training target, per-sample timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from genalign.core.schedules import DiffusionSchedule, FlowSchedule

    if kind == "flow":
        schedule = FlowSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    else:
        schedule = DiffusionSchedule({**DDIMScheduler(prediction_type=kind).config, "_class_name": "DDIMScheduler"})
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500, 990])
    x_t = schedule.add_noise(x0, noise, timesteps)
    estimate = schedule.clean_estimate(x_t, schedule.training_target(x0, noise, timesteps), timesteps)
    torch.testing.assert_close(estimate, x0, rtol=1e-4, atol=1e-4)
    # by hand for one sample: flow x_0 = x_t - sigma v; epsilon x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
    if kind == "flow":
        by_hand = x_t[1] - 0.5 * (noise[1] - x0[1])
        torch.testing.assert_close(schedule.clean_estimate(x_t[1:2], (noise - x0)[1:2], torch.tensor([500.0]))[0], by_hand)
    elif kind == "epsilon":
        a = schedule.alpha_prod(torch.tensor(500))
        torch.testing.assert_close(estimate[1], (x_t[1] - (1 - a).sqrt() * noise[1]) / a.sqrt(), rtol=1e-4, atol=1e-4)


def test_a_flow_sde_training_step_reads_nothing_back_from_the_device():
    """The training pass's step (its sample given) holds no host sync: on the meta device, which
    stands in for a GPU here, any read-back fails. sigma = 1 takes sigma_max without a check."""
    from genalign.core.sampling import flow_sde_step, gaussian_kl_equal_std

    x = torch.randn(2, 4, 8, 8)
    sigma, sigma_next = torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.4])
    on_cpu = flow_sde_step(x, -x, sigma, sigma_next, 0.7, prev_sample=x, sigma_max=0.95)
    on_meta = flow_sde_step(x.to("meta"), -x.to("meta"), sigma.to("meta"), sigma_next.to("meta"), 0.7,
                            prev_sample=x.to("meta"), sigma_max=0.95)
    assert [t.shape for t in on_meta] == [t.shape for t in on_cpu] and on_meta[1].device.type == "meta"
    assert gaussian_kl_equal_std(x.to("meta"), x.to("meta"), on_meta[3]).shape == (2,)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(x, -x, sigma, sigma_next, 0.7, prev_sample=x)
