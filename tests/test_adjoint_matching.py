"""Adjoint Matching: the pure math against hand-computed values, the lean adjoint against closed
forms and against autograd through the whole sampling chain, and the 1-D Gaussian tilt."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from genalign.core.experiment import BackboneConfig, SampleConfig
from genalign.core.schedules import FlowSchedule
from genalign.core.types import Conditioning
from genalign.finetuners.adjoint_matching import (
    AdjointMatching,
    AdjointMatchingConfig,
    adjoint_matching_loss,
    lean_adjoint,
    marginal_drift,
    memoryless_sigma,
    timestep_subset,
)
from genalign.pipelines import load_backbone
from tests.loss_parts import assert_backward_loss_matches_loss

# ------------------------------------------------------------------ pure functions


def test_memoryless_sigma_and_drift_by_hand():
    # sigma(t)^2 = 2 (1 - t + o) / (t + o): t = 0.25, o = 0 -> 2 * 0.75 / 0.25 = 6
    assert memoryless_sigma(0.25) == pytest.approx(math.sqrt(6.0))
    assert memoryless_sigma(0.0, 0.1) == pytest.approx(math.sqrt(2 * 1.1 / 0.1))
    assert float(memoryless_sigma(torch.tensor(0.5), 0.0)) == pytest.approx(math.sqrt(2.0))
    # With the memoryless sigma the drift is 2 u - x / t: u = 3, x = 2, t = 0.25 -> 6 - 8 = -2
    u, x = torch.tensor([3.0]), torch.tensor([2.0])
    drift = marginal_drift(u, x, 0.25, float(memoryless_sigma(0.25)))
    assert float(drift) == pytest.approx(-2.0)
    # any sigma: u - s^2/2 (x - t u) / (1 - t): s = 1, t = 0.5 -> 3 - 0.5 * (2 - 1.5) / 0.5 = 2.5
    assert float(marginal_drift(u, x, 0.5, 1.0)) == pytest.approx(2.5)
    assert float(marginal_drift(u, x, 0.5, 0.0)) == 3.0  # sigma = 0: the ODE


def test_adjoint_matching_loss_by_hand():
    # memoryless at t = 0.5: sigma = sqrt(2); drift difference = 2 (u_ft - u_base)
    sigma = math.sqrt(2.0)
    u_ft = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    u_base = torch.tensor([[0.5, 1.0], [0.0, 1.0]])
    adjoint = torch.tensor([[-1.0, 0.0], [2.0, -1.0]])
    x = torch.zeros(2, 2)
    drift_ft = marginal_drift(u_ft, x, 0.5, sigma)
    drift_base = marginal_drift(u_base, x, 0.5, sigma)
    loss = adjoint_matching_loss(drift_ft, drift_base, adjoint, sigma)
    # row 0: (2/s)(0.5, 1) + s(-1, 0) = (1/s - s, 2/s) = (-0.7071, 1.4142) -> (0.5 + 2) / 2 = 1.25
    # row 1: (2/s)(0, -1) + s(2, -1) = (2s, -2/s - s) = (2.8284, -2.8284) -> (8 + 8) / 2 = 8
    torch.testing.assert_close(loss, torch.tensor([1.25, 8.0]))
    torch.testing.assert_close(adjoint_matching_loss(drift_ft, drift_base, adjoint, sigma, clip=2.0),
                               torch.tensor([1.25, 2.0]))
    # the optimum: u_ft - u_base = -sigma^2 a / 2 gives zero
    optimum = marginal_drift(u_base - sigma**2 * adjoint / 2, x, 0.5, sigma)
    torch.testing.assert_close(adjoint_matching_loss(optimum, drift_base, adjoint, sigma), torch.zeros(2))
    # only the fine-tuned drift gets a gradient
    drift_ft.requires_grad_(True)
    drift_base.requires_grad_(True)
    adjoint_matching_loss(drift_ft, drift_base, adjoint, sigma).sum().backward()
    assert drift_ft.grad is not None and drift_base.grad is None


def test_timestep_subset_takes_every_late_step_and_some_early_ones():
    steps = timestep_subset(40, 10, 0.25, torch.Generator().manual_seed(0))
    assert steps[-10:] == list(range(30, 40)) and len(steps) == 20
    assert all(0 <= k < 30 for k in steps[:10]) and len(set(steps)) == 20 and steps == sorted(steps)
    assert timestep_subset(4, 10, 0.25) == [0, 1, 2, 3]  # fewer early steps than asked: all of them
    assert timestep_subset(4, 0, 0.1) == [3]


def test_lean_adjoint_of_a_linear_drift_matches_its_closed_form():
    """b(x) = A x: a_k = (I + h A)^T a_{k+1} exactly, and a(t) = expm(A^T (1 - t)) a(1) in the limit."""
    A = torch.tensor([[-0.5, 1.0], [0.3, 0.2]], dtype=torch.float64)
    terminal = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=torch.float64)  # two samples
    for num_steps in (5, 4000):
        h = 1.0 / num_steps
        states = torch.randn(num_steps + 1, 2, 2, dtype=torch.float64)  # a linear drift ignores them
        adjoints = lean_adjoint(states, terminal, lambda x, k, h=h: x + h * x @ A.T)
        if num_steps == 5:
            step = torch.eye(2, dtype=torch.float64) + h * A
            for k in range(6):
                expected = terminal @ torch.linalg.matrix_power(step, 5 - k)
                torch.testing.assert_close(adjoints[k], expected)
        else:
            for k, t in ((0, 0.0), (2000, 0.5)):
                exact = terminal @ torch.linalg.matrix_exp(A * (1 - t))
                torch.testing.assert_close(adjoints[k], exact, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ on real backbones


@pytest.mark.parametrize("family,prediction", [("sd3", "flow"), ("qwenimage", "flow"), ("zimage", "flow"),
                                                    ("flux2-klein", "flow"), ("wan", "flow"), ("sd", "epsilon")])
def test_lean_adjoint_at_the_start_is_the_gradient_through_the_sampling_chain(tiny_models, family, prediction):
    """Before fine-tuning (control 0) the lean adjoint is the true adjoint: a_0 equals
    -lambda d r(X_1) / d X_0 through every SDE step with its noise held fixed."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family=family, path=tiny_models(family, prediction), finetune="lora"), "cpu")
    reward = _MeanReward()
    am = AdjointMatching(AdjointMatchingConfig(reward_multiplier=2.0), backbone, reward,
                         SampleConfig(num_steps=4, guidance_scale=1.0))
    cond = backbone.encode_prompts(["a red circle", "a blue square"], guidance=False)
    states = am.rollout(cond, torch.Generator().manual_seed(0))
    terminal, _ = am.terminal_adjoint(states[-1], cond.prompts)

    def base_mean(x, k):
        return x.float() + am.sde.h[k] * am._drift(x, k, cond)

    with backbone.reference():
        adjoints = lean_adjoint(states, terminal, base_mean)
        # the same chain, differentiable from X_0, with each step's noise recovered from the states
        x0 = states[0].clone().requires_grad_(True)
        x = x0
        for k in range(am.sde.num_steps):
            with torch.no_grad():
                noise = states[k + 1] - base_mean(states[k], k)
            x = base_mean(x, k) + noise
        torch.testing.assert_close(x.detach(), states[-1], rtol=1e-4, atol=1e-4)
        images = backbone.decode(x)
        (grad,) = torch.autograd.grad(reward(images, cond.prompts)[0].sum(), x0)
    torch.testing.assert_close(adjoints[0], -2.0 * grad, rtol=1e-3, atol=1e-5)
    assert adjoints[0].abs().sum() > 0


def test_a_fresh_lora_has_the_loss_of_the_uncontrolled_model_and_training_lowers_it(tiny_models):
    """With a zero control the loss is sigma^2 ||a||^2 (mean); a few steps on one batch lower it
    (a tiny random transformer can only approach the optimal control slowly)."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="full"), "cpu")
    am = AdjointMatching(AdjointMatchingConfig(reward_multiplier=2000.0, num_early_steps=3), backbone, _MeanReward(),
                         SampleConfig(num_steps=4, guidance_scale=1.0))
    batch = am.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert batch.steps == [0, 1, 2, 3] and batch.states.shape[:2] == (4, 2)
    loss, metrics = am.loss(batch)
    expected = sum(am.sde.sigma[k] ** 2 * batch.adjoints[i].pow(2).flatten(1).mean(1).mean()
                   for i, k in enumerate(batch.steps))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    optimizer = torch.optim.Adam(list(am.named_trainable_parameters().values()), lr=1e-3)
    for _ in range(25):
        loss, _ = am.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(am.loss(batch)[0].detach()) < 0.97 * float(expected)


def test_configuration_errors_are_clear(tiny_models):
    backbone = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="lora"), "cpu")
    sample = SampleConfig(num_steps=4, guidance_scale=1.0)
    with pytest.raises(ValueError, match="differentiable"):
        AdjointMatching(AdjointMatchingConfig(), backbone, SimpleNamespace(differentiable=False, name="jpeg"), sample)
    with pytest.raises(ValueError, match="needs a differentiable reward"):
        AdjointMatching(AdjointMatchingConfig(), backbone, None, sample)
    with pytest.raises(ValueError, match="time_offset"):
        AdjointMatchingConfig(time_offset=0.0)
    sd = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora"), "cpu")
    with pytest.raises(ValueError, match="only defined for flow"):
        AdjointMatching(AdjointMatchingConfig(noise_schedule="constant"), sd, _MeanReward(), sample)
    # options that would do nothing are refused, naming why
    for option in ({"time_offset": 0.5}, {"final_step": "ode"}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} shape the flow SDE"):
            AdjointMatching(AdjointMatchingConfig(**option), sd, _MeanReward(), sample)
    with pytest.raises(ValueError, match="with memoryless it does nothing"):
        AdjointMatchingConfig(constant_noise=0.5)
    assert AdjointMatching(AdjointMatchingConfig(time_offset=0.5, final_step="ode"), backbone, _MeanReward(), sample)


class _MeanReward:
    differentiable = True

    def __call__(self, images, prompts, metadata=None):
        scores = images.float().flatten(1).mean(1) + images[:, 0].float().pow(2).flatten(1).mean(1)
        return scores, {}


# ------------------------------------------------------------------ the 1-D Gaussian tilt


class GaussianFlow1D:
    """A flow 'backbone' on 1-D latents whose base velocity is the exact one for N(0, 1) data
    (diffusers convention: x = (1 - s) x_0 + s n, v = E[n - x_0 | x] = x (2 s - 1) / ((1 - s)^2 + s^2)),
    fine-tuned through an additive MLP of (x, s) whose last layer starts at zero."""

    parameterisation = "flow"

    def __init__(self):
        self.schedule = FlowSchedule({"num_train_timesteps": 1000, "shift": 1.0}, linspace_sigmas=True)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.config = SimpleNamespace(finetune="lora")
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.enabled = True

    def latent_shape(self, height=None, width=None):
        return (1, 1, 1)

    def encode_prompts(self, prompts, negative_prompts=None, guidance=True):
        return Conditioning({"none": torch.zeros(len(prompts), 1)}, None, list(prompts))

    def predict(self, x, timestep, cond, guidance_scale=1.0):
        s = torch.as_tensor(timestep, dtype=torch.float32) / 1000
        base = x * (2 * s - 1) / ((1 - s) ** 2 + s**2)
        if not self.enabled:
            return base
        features = torch.stack([x.reshape(-1), s.expand(x.shape[0])], dim=1)
        return base + self.net(features).view_as(x)

    def decode(self, latents):
        return latents

    def named_trainable_parameters(self):
        return dict(self.net.named_parameters())

    @contextmanager
    def reference(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def training(self):
        return nullcontext()

    def keep_reference(self):  # the reference is the base flow (its learned part switched off): nothing to copy
        pass


class _Linear:
    differentiable = True

    def __init__(self, slope):
        self.slope = slope

    def __call__(self, images, prompts, metadata=None):
        return self.slope * images.reshape(-1), {}


def _tilt(noise_schedule: str) -> tuple[float, float]:
    """Fine-tune the 1-D Gaussian toward N(0, 1) exp(lambda a x) = N(lambda a, 1); mean and std of
    the fine-tuned model's samples (the same SDE it was trained with)."""
    backbone = GaussianFlow1D()
    config = AdjointMatchingConfig(reward_multiplier=1.5, noise_schedule=noise_schedule, constant_noise=1.0)
    am = AdjointMatching(config, backbone, _Linear(1.0), SampleConfig(num_steps=10, guidance_scale=1.0))
    optimizer = torch.optim.Adam(backbone.net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = am.loss(am.collect([""] * 256, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cond = backbone.encode_prompts([""] * 20000)
    final = am.rollout(cond, torch.Generator().manual_seed(1))[-1].reshape(-1)
    return float(final.mean()), float(final.std())


def test_adjoint_matching_tilts_a_gaussian_to_the_target_only_with_the_memoryless_schedule():
    """Target N(1.5, 1). Memoryless: on target. Constant sigma = 1: X_0 and X_1 stay correlated
    (rho ~ 0.44 on this grid), the optimum tilts the joint law and the mean lands near
    1.5 (1 - rho^2) ~ 1.2 (the paper's point; measured 1.47 vs 1.12 after 300 steps)."""
    mean, std = _tilt("memoryless")
    assert mean == pytest.approx(1.5, abs=0.08)
    assert std == pytest.approx(1.0, abs=0.08)
    biased, _ = _tilt("constant")
    assert biased < 1.3 and abs(biased - 1.5) > 2 * abs(mean - 1.5)


def test_the_flow_sde_is_the_memoryless_flow_grpo_step_in_diffusers_convention(tiny_models):
    """Away from t = 0 (and with no offset) the SDE's Euler-Maruyama step equals
    ``sampling.flow_sde_step`` with noise level sqrt(2) (t = 1 - sigma, u = -v): mean and std."""
    from genalign.core.sampling import MEMORYLESS_NOISE_LEVEL, flow_sde_step
    backbone = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="none"), "cpu")
    sde = backbone.schedule.memoryless_sde(6, time_offset=1e-9)
    _, sigmas = backbone.schedule.sigmas(6)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for k in range(1, 5):
        _, _, mean, std = flow_sde_step(x, v, sigmas[k], sigmas[k + 1], MEMORYLESS_NOISE_LEVEL)
        torch.testing.assert_close(x + sde.h[k] * sde.drift(x, v, k), mean, rtol=1e-4, atol=1e-5)
        assert sde.std(k) == pytest.approx(float(std.reshape(-1)[0]), rel=1e-4)
        # and it is 2 u - x / t with u = -v
        torch.testing.assert_close(sde.drift(x, v, k), 2 * (-v) - x / sde.t[k], rtol=1e-4, atol=1e-4)


def test_the_clean_estimate_terminal_is_the_one_step_prediction(tiny_models):
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="lora"), "cpu")
    am = AdjointMatching(AdjointMatchingConfig(terminal="clean_estimate"), backbone, _MeanReward(),
                         SampleConfig(num_steps=4, guidance_scale=1.0))
    cond = backbone.encode_prompts(["a red circle"], guidance=False)
    states = am.rollout(cond, torch.Generator().manual_seed(0))
    estimate = am.clean_estimate(states, cond)
    # the estimate sits between the last-but-one state and where the ODE would land: x + (1 - t) u
    v = backbone.predict(states[3], am.sde.timesteps[3], cond)
    torch.testing.assert_close(estimate, states[3] - (1 - am.sde.t[3]) * v)
    batch = am.collect(["a red circle"], torch.Generator().manual_seed(0))
    terminal, _ = am.terminal_adjoint(estimate, ["a red circle"])
    assert batch.steps[-1] == 3
    torch.testing.assert_close(batch.adjoints[-1], terminal)


def test_backward_loss_gives_the_loss_and_gradient_of_the_whole_loss(tiny_models):
    """The trainer's path, one backward per trained step (memory of one step), equals
    loss().backward() of the sum, the clipped fraction included."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="lora",
                                            lora_rank=4), "cpu")
    am = AdjointMatching(AdjointMatchingConfig(reward_multiplier=2000.0, num_early_steps=3, loss_clip=1e-3),
                         backbone, _MeanReward(), SampleConfig(num_steps=4, guidance_scale=1.0))
    batch = am.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in am.named_trainable_parameters().values():  # a non-zero control: every term has a gradient
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    metrics = assert_backward_loss_matches_loss(am, batch, expected_parts=len(batch.steps))
    assert "clipped_fraction" in metrics


def test_the_ddpm_sde_drift_is_diffusers_ddim_eta_1_mean_and_draws_nothing():
    # drift = (mean - x) / h with mean diffusers' DDIM step at eta = 1 and zero variance noise
    from diffusers import DDIMScheduler

    from genalign.core.schedules import DiffusionSchedule

    reference = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)  # SD's
    sde = DiffusionSchedule({**reference.config, "_class_name": "DDIMScheduler"}).memoryless_sde(4)
    reference.set_timesteps(4)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for k, t in enumerate(reference.timesteps):
        mean = reference.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        h = 250 / 1000  # T // N of the 1,000 training timesteps, over T
        state = torch.get_rng_state()
        drift = sde.drift(x, eps, k)
        assert torch.equal(torch.get_rng_state(), state)  # the unused noise of a DDPM step is not drawn
        torch.testing.assert_close(drift, (mean - x) / h, rtol=1e-4, atol=1e-4)
