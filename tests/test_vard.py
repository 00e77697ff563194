"""VARD: the pure objectives by hand, the value model's regression on Monte-Carlo returns, and the
method on tiny SD (epsilon) and SD3 (flow) backbones with a non-differentiable reward."""

from __future__ import annotations

import pytest
import torch

from genalign.core.experiment import BackboneConfig, SampleConfig
from genalign.finetuners.vard import VARD, VARDConfig, value_regression_loss, vard_policy_loss
from genalign.pipelines import load_backbone
from tests.loss_parts import assert_backward_loss_matches_loss


def test_policy_loss_by_hand():
    values = torch.tensor([1.0, 3.0])
    mean_policy = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    mean_reference = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    loss, kl = vard_policy_loss(values, mean_policy, mean_reference, 0.5, kl_weight=0.1)
    # KL per element = d^2 / (2 * 0.25) = 2 d^2: sample 0: (2 + 0) / 2 = 1; sample 1: (0 + 8) / 2 = 4
    torch.testing.assert_close(kl, torch.tensor([1.0, 4.0]), rtol=0, atol=1e-6)
    # -mean(V) + 0.1 * mean(KL) = -2 + 0.25
    assert float(loss) == pytest.approx(-1.75)
    loss.backward()
    # d/dmu of 0.1 * mean_B mean_elem 2 d^2 = 0.1 * 4 d / (2 * 2)
    torch.testing.assert_close(mean_policy.grad, 0.1 * (mean_policy - mean_reference).detach())
    with pytest.raises(ValueError, match="std > 0"):
        vard_policy_loss(values, mean_policy, mean_reference, 0.0, 0.1)
    assert float(value_regression_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))) == pytest.approx(2.5)


class _Brightness:
    """A non-differentiable reward: images' mean brightness (through numpy)."""

    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        scores = torch.from_numpy(images.detach().float().flatten(1).mean(1).numpy().copy())
        return scores, {}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from genalign.rewards.clip import TransformersCLIP
    from tests.reward_models import save_tiny_transformers_clip

    folder = save_tiny_transformers_clip(tmp_path_factory.mktemp("value_clip"))
    return TransformersCLIP(str(folder), torch.device("cpu"), torch.float32)


def _vard(tiny_models, family="sd", prediction="epsilon", encoder=None, guidance=1.0, **overrides):
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family=family, path=tiny_models(family, prediction), finetune="lora"), "cpu")
    inputs = "encoder" if encoder is not None else "latent"
    config = VARDConfig(**{"value_warmup": 1, "samples_per_prompt": 2, "steps_per_update": 2, "value_inputs": inputs,
                           **overrides})
    eta = 1.0 if family == "sd" else 0.7
    return VARD(config, backbone, _Brightness(), SampleConfig(num_steps=4, guidance_scale=guidance, eta=eta),
                encoder=encoder)


@pytest.mark.parametrize("family,prediction,inputs", [("sd", "epsilon", "latent"), ("sd3", "flow", "latent"), ("wan", "flow", "latent"),
                                                      ("sd", "epsilon", "encoder"), ("sd3", "flow", "encoder")])
def test_the_policy_step_reproduces_the_trajectory_and_training_raises_the_value(tiny_models, tiny_clip, family,
                                                                                 prediction, inputs):
    vard = _vard(tiny_models, family, prediction, encoder=tiny_clip if inputs == "encoder" else None, kl_weight=0.01)
    vard.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))  # warm-up: value only
    vard.after_optimizer_step()
    batch = vard.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    trajectory, steps = batch.trajectory, batch.steps
    assert steps and all(bool((trajectory.stds[k] > 0).any()) for k in steps)
    # at the start the reparameterised step lands exactly on the stored next state, KL 0
    k = steps[0]
    mean = vard._step_mean(trajectory, k, trajectory.cond)
    torch.testing.assert_close(mean, trajectory.means[k].float(), rtol=1e-4, atol=1e-5)
    start, metrics = vard.loss(batch)
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-10)
    value_before = float(metrics["value_policy"])
    optimizer = torch.optim.Adam(list(vard.params.values()), lr=1e-2)
    for param in vard.learner.model.parameters():
        param.grad = None
    for _ in range(10):
        loss, metrics = vard.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, metrics = vard.loss(batch)
    assert float(metrics["value_policy"]) > value_before and float(metrics["kl"]) > 0
    # the policy loss gives the value model no gradient (it is frozen there)
    assert all(p.grad is None for p in vard.learner.model.parameters())
    assert all(p.requires_grad for p in vard.learner.model.parameters())  # and trainable again afterwards


def test_value_states_carry_their_trajectorys_return(tiny_models):
    vard = _vard(tiny_models, replay_size=0, shaping="none")
    vard.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    replay = vard.learner.replay
    batch, steps = 4, 4  # 2 prompts x 2 samples, 4 sampling steps
    assert replay["x"].shape[0] == batch * steps
    # state j of step s belongs to trajectory j: every step repeats the batch's returns in order
    returns = replay["target"].view(steps, batch)
    assert torch.equal(returns, returns[0].expand(steps, batch))
    # the timesteps are those the states are at (after each step), in sampling order
    times = replay["t"].view(steps, batch)[:, 0]
    assert bool((times[1:] < times[:-1]).all())


def test_the_value_error_on_new_trajectories_falls(tiny_models):
    """The value model's error on trajectories it has not seen yet falls as it trains."""
    vard = _vard(tiny_models, value_warmup=1000, value_updates=8, value_lr=3e-3, shaping="none")
    errors = []
    for step in range(12):
        batch = vard.collect(["a red circle", "a blue square", "a green triangle"], torch.Generator().manual_seed(step))
        errors.append(float(batch.metrics["value_error_new"]))
    assert sum(errors[-3:]) / 3 < 0.5 * sum(errors[:3]) / 3


def test_configuration_errors(tiny_models):
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora"), "cpu")
    with pytest.raises(ValueError, match="eta > 0"):
        VARD(VARDConfig(), backbone, _Brightness(), SampleConfig(num_steps=4, eta=0.0))
    with pytest.raises(ValueError, match="needs a reward"):
        VARD(VARDConfig(), backbone, None, SampleConfig(num_steps=4, eta=1.0))
    with pytest.raises(ValueError, match="kl_weight"):
        VARDConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="method.value_encoder"):
        VARD(VARDConfig(value_inputs="encoder"), backbone, _Brightness(), SampleConfig(num_steps=4, eta=1.0))


@pytest.mark.parametrize("family,prediction", [("sd", "epsilon"), ("sd3", "flow")])
def test_encoder_value_inputs_are_the_encoder_on_the_references_clean_estimate(tiny_models, tiny_clip, family,
                                                                               prediction):
    """``encoder`` inputs by hand: CLIP of the decoded one-step clean estimate of the reference
    (guided), the final state decoded as it is; unchanged by the LoRA; differentiable in the state."""
    vard = _vard(tiny_models, family, prediction, encoder=tiny_clip, guidance=2.0)
    backbone, features = vard.backbone, vard.learner.features
    cond = backbone.encode_prompts(["a red circle", "a blue square"], guidance=True)
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(0))
    timestep = backbone.schedule.timesteps(4)[1]
    with torch.no_grad():
        with backbone.reference():
            output = backbone.predict(x, timestep, cond, 2.0)
        if prediction == "flow":  # x_0 = x_sigma - sigma v
            clean = x - float(timestep) / 1000 * output
        else:  # x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
            a = backbone.schedule.alpha_prod(timestep)
            clean = (x - (1 - a).sqrt() * output) / a.sqrt()
        expected = tiny_clip.image_embeds(backbone.decode(clean))
        got = features(x, timestep, cond)
        torch.testing.assert_close(got["image"], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["text"], tiny_clip.text_embeds(["a red circle", "a blue square"]))
        end = backbone.schedule.previous_timestep(backbone.schedule.timesteps(4)[-1], 4)
        final = features(x, end, cond)
        torch.testing.assert_close(final["image"], tiny_clip.image_embeds(backbone.decode(x)), rtol=1e-4, atol=1e-5)
        assert float(final["t"].abs().max()) == 0.0
        for param in vard.params.values():  # a trained LoRA does not change the features (the reference)
            param.add_(0.5)
        torch.testing.assert_close(features(x, timestep, cond)["image"], got["image"])
    state = x.clone().requires_grad_(True)
    vard.learner(state, timestep, cond).sum().backward()
    assert state.grad is not None and float(state.grad.abs().sum()) > 0


def test_trained_fraction_keeps_policy_updates_to_the_early_steps(tiny_models):
    vard = _vard(tiny_models, trained_fraction=0.5, steps_per_update=4, value_warmup=0)
    batch = vard.collect(["a red circle"], torch.Generator().manual_seed(0))
    trajectory, steps = batch.trajectory, batch.steps
    stochastic = [k for k in range(trajectory.num_steps) if bool((trajectory.stds[k] > 0).any())]
    assert len(stochastic) == 4  # 4 DDIM eta-1 steps (the tiny model ends at alphas_cumprod[0] < 1)
    assert steps == stochastic[:2]  # round(0.5 * 4) = 2 eligible, both drawn
    with pytest.raises(ValueError, match="trained_fraction"):
        VARDConfig(trained_fraction=0.0)


def test_normalized_value_surrogate_by_hand():
    """V = sum(a_i * x_i): the surrogate's gradient in x_i is a_i / rms(a_i) / numel, whatever |a_i|."""
    from genalign.finetuners.vard import normalized_value_surrogate

    a = torch.tensor([[3.0, 4.0], [0.01, 0.0]])  # rms 3.5355 and 0.00707
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    values = (a * x).sum(1)
    surrogate = normalized_value_surrogate(values, x)
    # value of the surrogate: mean(x * a / rms) per sample
    rms = a.pow(2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(surrogate, (x * a / rms).mean(1).detach())
    surrogate.sum().backward()
    torch.testing.assert_close(x.grad, a / rms / 2)
    assert float(x.grad[1].norm()) == pytest.approx(float(x.grad[0].norm()))


def test_backward_loss_gives_the_loss_and_gradient_of_the_whole_loss(tiny_models, tiny_clip):
    """The trainer's path, one backward per trained step (each holding a decode and a CLIP pass
    with encoder value inputs), equals loss().backward() of the sum; the value model stays out."""
    vard = _vard(tiny_models, "sd", "epsilon", encoder=tiny_clip, kl_weight=0.01)
    vard.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))  # warm-up: value only
    vard.after_optimizer_step()
    batch = vard.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in vard.params.values():  # away from the reference: the KL term has a gradient too
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for p in vard.learner.model.parameters():  # left by the value model's own training
        p.grad = None
    metrics = assert_backward_loss_matches_loss(vard, batch, expected_parts=len(batch.steps))
    assert float(metrics["kl"]) > 0
    assert all(p.grad is None and p.requires_grad for p in vard.learner.model.parameters())


def test_adapt_kl_weight_by_hand():
    from genalign.finetuners.vard import adapt_kl_weight

    # target 1e-3: below 1e-3 / 1.5 halves, above 1.5e-3 doubles, in between keeps
    assert adapt_kl_weight(1.0, 5e-4, 1e-3) == 0.5
    assert adapt_kl_weight(1.0, 2e-3, 1e-3) == 2.0
    assert adapt_kl_weight(1.0, 1.2e-3, 1e-3) == 1.0
    assert adapt_kl_weight(1.0, 0.7e-3, 1e-3) == 1.0


def test_kl_target_adapts_the_weight_after_each_policy_step(tiny_models):
    vard = _vard(tiny_models, kl_weight=1.0, kl_target=1e-3)
    vard.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))  # warm-up
    vard.after_optimizer_step()
    assert vard.kl_weight == 1.0  # no policy loss yet: nothing to adapt to
    batch = vard.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    _, metrics = vard.loss(batch)  # the policy starts at the reference: KL 0, below target
    assert float(metrics["kl_weight"]) == 1.0
    vard.after_optimizer_step()
    assert vard.kl_weight == 0.5
    # move the LoRA far from the reference: KL above target doubles the weight
    with torch.no_grad():
        for p in vard.params.values():
            p.add_(0.5 * torch.randn_like(p))
    _, metrics = vard.loss(batch)
    assert float(metrics["kl"]) > 1.5e-3
    vard.after_optimizer_step()
    assert vard.kl_weight == 1.0
    # the adapted weight is checkpointed, and fixed weights (kl_target 0) never change
    state = vard.state_dict()
    fresh = _vard(tiny_models, kl_weight=4.0, kl_target=1e-3)
    fresh.load_state_dict(state)
    assert fresh.kl_weight == 1.0 and state["kl_weight"] == 1.0
    for _ in range(6):  # bounded: never above 16x the configured weight
        vard._step_kls = [torch.tensor(1.0)]
        vard.after_optimizer_step()
    assert vard.kl_weight == 16.0
    for _ in range(10):  # and never below 1/16 of it
        vard._step_kls = [torch.tensor(0.0)]
        vard.after_optimizer_step()
    assert vard.kl_weight == 1 / 16
    # gradient accumulation: the KL of the step is the mean over its micro-batches (1e-3: keep)
    vard.kl_weight = 1.0
    vard._step_kls = [torch.tensor(0.0), torch.tensor(2e-3)]
    vard.after_optimizer_step()
    assert vard.kl_weight == 1.0 and vard._step_kls == []
    # kl_adapt tighten: the target is a ceiling; the weight rises above kl_weight, never below it
    tight = _vard(tiny_models, kl_weight=0.5, kl_target=1e-3, kl_adapt="tighten")
    for kl, expected in [(0.0, 0.5), (2e-3, 1.0), (2e-3, 2.0), (0.0, 1.0), (0.0, 0.5), (0.0, 0.5)]:
        tight._step_kls = [torch.tensor(kl)]
        tight.after_optimizer_step()
        assert tight.kl_weight == expected
    fixed = _vard(tiny_models, kl_weight=0.3)
    fixed._step_kls = [torch.tensor(1.0)]
    fixed.after_optimizer_step()
    assert fixed.kl_weight == 0.3
    with pytest.raises(ValueError, match="kl_target"):
        VARDConfig(kl_target=-1.0)
    with pytest.raises(ValueError, match="kl_weight > 0"):
        VARDConfig(kl_weight=0.0, kl_target=1e-3)
