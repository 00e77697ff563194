"""AC-Flow: the pure objective and weights by hand, the critic and its training, the method on a
tiny flow backbone (warm-up, checkpoint state, actor steps)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from genalign.core.experiment import BackboneConfig, SampleConfig
from genalign.core.types import Conditioning
from genalign.finetuners.ac_flow import ACFlow, ACFlowConfig, ac_flow_actor_loss, advantage_weights
from genalign.finetuners.value import (
    RunningStandardiser,
    ValueModel,
    prompt_features,
    shape_rewards,
    timestep_embedding,
    value_loss,
)
from genalign.pipelines import load_backbone


def test_advantage_weights_by_hand():
    a = torch.tensor([-3.0, 0.0, 1.0])
    # exponential, beta 1, clip 2: exp([-2, 0, 1]) normalised to mean 1
    raw = torch.tensor([math.exp(-2), 1.0, math.e])
    torch.testing.assert_close(advantage_weights(a, "exponential", 1.0, 2.0), raw / raw.mean())
    # linear, beta 2: max(0, 1 + [-2, 0, 1] / 2) = [0, 1, 1.5], mean 5/6 -> [0, 1.2, 1.8]
    torch.testing.assert_close(advantage_weights(a, "linear", 2.0, 2.0), torch.tensor([0.0, 1.2, 1.8]))
    # a huge temperature makes every weight 1 (plain flow matching on the model's samples)
    torch.testing.assert_close(advantage_weights(a, "exponential", 1e9, 2.0), torch.ones(3))
    # relative: the same weights minus their mean 1 (sum 0: below-average samples push away)
    torch.testing.assert_close(advantage_weights(a, "exponential", 1.0, 2.0, relative=True), raw / raw.mean() - 1)
    torch.testing.assert_close(advantage_weights(a, "linear", 2.0, 2.0, relative=True), torch.tensor([-1.0, 0.2, 0.8]))
    assert torch.equal(advantage_weights(torch.full((2,), -5.0), "linear", 1.0, 5.0), torch.zeros(2))
    with pytest.raises(ValueError, match="unknown weighting"):
        advantage_weights(a, "softmax")


def test_actor_loss_by_hand():
    prediction = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weights = torch.tensor([0.5, 1.5])
    loss, weighted, w2 = ac_flow_actor_loss(prediction, target, reference, weights, alpha=2.0)
    # fm per sample: (1 + 0) / 2 = 0.5, (0 + 4) / 2 = 2 -> mean(0.5 * 0.5, 1.5 * 2) = (0.25 + 3) / 2 = 1.625
    # w2 per sample: (0 + 1) / 2 = 0.5, 0 -> 0.25; loss = 1.625 + 2 * 0.25 = 2.125
    assert float(weighted) == pytest.approx(1.625) and float(w2) == pytest.approx(0.25)
    assert float(loss) == pytest.approx(2.125)
    loss.backward()
    # d/dpred of w_i * mean_j (p - t)^2 / B + alpha * mean_j (p - r)^2 / B, B = 2, 2 elements
    expected = (weights[:, None] * (prediction - target) + 2.0 * (prediction - reference)).detach() / 2
    torch.testing.assert_close(prediction.grad, expected)


def test_reward_shaping_modes():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    prompts = ["a", "a", "b", "b"]
    # per prompt: each group standardised -> -1, 1, -1, 1
    torch.testing.assert_close(shape_rewards(rewards, prompts, "prompt", RunningStandardiser()),
                               torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    batch = shape_rewards(rewards, prompts, "batch", RunningStandardiser())
    assert float(batch.mean()) == pytest.approx(0.0, abs=1e-6) and float(batch.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    # running: the first batch is standardised by its own statistics (bias-corrected EMA)
    running = RunningStandardiser(momentum=0.9)
    torch.testing.assert_close(shape_rewards(rewards, prompts, "running", running), batch, atol=1e-4, rtol=0)
    # a second batch of [0, 0]: mean = (0.9 * 0.1 * 7 + 0.1 * 0) / (1 - 0.81), var likewise
    second = shape_rewards(torch.zeros(2), ["a", "b"], "running", running)
    mean = 0.9 * 0.1 * 7.0 / 0.19
    var = 0.9 * 0.1 * float(rewards.var(unbiased=False)) / 0.19
    torch.testing.assert_close(second, torch.full((2,), -mean / math.sqrt(var + 1e-6)))


def test_value_model_shapes_and_prompt_features():
    critic = ValueModel(latent_channels=4, text_dim=12, width=16)
    for size in (8, 32):  # any latent size
        out = critic(torch.randn(3, 4, size, size), torch.rand(3), torch.randn(3, 12))
        assert out.shape == (3,)
    assert timestep_embedding(torch.tensor([0.0, 1.0]), 8).shape == (2, 8)
    pooled = Conditioning({"prompt_embeds": torch.randn(2, 5, 7), "pooled": torch.randn(2, 3)})
    assert torch.equal(prompt_features(pooled), pooled.positive["pooled"])
    tokens = Conditioning({"prompt_embeds": torch.randn(2, 5, 7)})
    torch.testing.assert_close(prompt_features(tokens), tokens.positive["prompt_embeds"].mean(1))
    masked = Conditioning({"prompt_embeds": torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]]),
                           "mask": torch.tensor([[1, 1, 0]])})
    torch.testing.assert_close(prompt_features(masked), torch.tensor([[2.0, 3.0]]))  # the padding is left out
    assert float(value_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))) == pytest.approx(2.5)


def _acflow(tiny_models, family="sd3", **overrides):
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family=family, path=tiny_models(family, "flow"), finetune="lora"), "cpu")
    config = ACFlowConfig(**{"critic_warmup": 1, "samples_per_prompt": 2, "critic_batch": 16, "critic_inputs": "latent",
                             **overrides})
    return ACFlow(config, backbone, _Brightness(), SampleConfig(num_steps=3, guidance_scale=1.0))


class _Brightness:
    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        scores = images.float().flatten(1).mean(1)
        return scores, {}


def test_the_critic_learns_the_value_of_intermediate_states(tiny_models):
    """On samples whose reward is a fixed function of x_1, the critic's error on new noised states
    falls well below the variance of the targets (what predicting the mean would score), and is
    larger at noisier states (less is determined there)."""
    ac = _acflow(tiny_models, critic_updates=1, critic_batch=64, critic_lr=1e-3, replay_size=8192)
    generator = torch.Generator().manual_seed(0)
    schedule, features = ac.backbone.schedule, ac.learner.features
    cond = ac.backbone.encode_prompts([""], guidance=False)

    def states(x1, seed):  # noised with the backbone's training-timestep law
        t = schedule.sample_training_timesteps(x1.shape[0], torch.Generator().manual_seed(seed))
        noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
        return features(schedule.add_noise(x1, noise, t), t, cond.select([0] * x1.shape[0]))

    x1 = torch.randn(2048, *ac.backbone.latent_shape(), generator=generator)
    target = x1[:, 0].mean(dim=(1, 2)) * 4  # value determined by the clean latents
    for seed in range(4):  # four noisings of each sample
        ac.learner.remember({**states(x1, seed), "target": target})
    held_out = torch.randn(128, *ac.backbone.latent_shape(), generator=generator)
    held_target = held_out[:, 0].mean(dim=(1, 2)) * 4

    def error(sigma):  # at noise level sigma the best possible error is var * sigma^2 / ((1 - sigma)^2 + sigma^2)
        with torch.no_grad():
            t = torch.full((128,), sigma * 1000.0)
            noise = torch.randn(held_out.shape, generator=torch.Generator().manual_seed(1))
            x_t = schedule.add_noise(held_out, noise, t)
            return float(value_loss(ac.learner(x_t, t, cond.select([0] * 128)), held_target))

    before = error(0.2)
    for _ in range(400):
        ac.learner.train(generator)
    variance = float(held_target.var())
    assert error(0.2) < 0.4 * variance and error(0.2) < 0.4 * before  # floor: 0.06 variance
    assert error(0.8) > error(0.2)  # noisier states say less about the outcome


@pytest.mark.parametrize("family", ["sd3", "qwenimage", "zimage", "flux2-klein", "wan"])
def test_warmup_trains_only_the_critic_then_the_actor_learns(tiny_models, family):
    ac = _acflow(tiny_models, family, critic_warmup=1, alpha=0.5)
    critic_before = [p.detach().clone() for p in ac.learner.model.parameters()]
    batch = ac.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert batch.actor is None and batch.metrics["warmup"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, ac.learner.model.parameters(), strict=True))
    loss, _ = ac.loss(batch)
    loss.backward()
    assert float(loss) == 0.0 and all(float(p.grad.abs().sum()) == 0 for p in ac.params.values())
    ac.after_optimizer_step()
    batch = ac.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    x_t, timesteps, cond, target, reference, weights = batch.actor
    assert x_t.shape[0] == 2 * 2 * 2 and cond.negative is None  # prompts x samples x timesteps
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-5)
    start, metrics = ac.loss(batch)
    assert float(metrics["w2"]) == pytest.approx(0.0, abs=1e-10)  # a fresh LoRA is the reference
    optimizer = torch.optim.Adam(list(ac.params.values()), lr=1e-2)
    for _ in range(10):
        loss, _ = ac.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end, metrics = ac.loss(batch)
    assert float(end) < float(start) and float(metrics["w2"]) > 0


def test_the_advantage_is_the_shaped_reward_minus_the_critics_value(tiny_models):
    """A_i = r~_i - V(x_t^i): with the critic held at 0 the weights rise with the reward (batch
    shaping, exponential weights: w ordered as r); with equal rewards (r~ = 0) and a critic whose
    value rises along the batch, the weights fall along it. Either sign flipped fails one half."""
    class _Table:
        differentiable = False

        def __init__(self, values):
            self.values = torch.tensor(values)

        def __call__(self, images, prompts, metadata=None):
            return self.values[: len(prompts)].clone(), {}

    ac = _acflow(tiny_models, critic_warmup=0, shaping="batch", timesteps_per_sample=1, clip_range=10.0)
    ac.reward = _Table([0.2, 0.9, 0.5, 0.1])
    ac.learner.train = lambda generator: 0.0  # the critic is held where the test puts it
    ac.learner.value = lambda features: torch.zeros(next(iter(features.values())).shape[0])
    weights = ac.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0)).actor[5]
    assert weights.argsort().tolist() == [3, 0, 2, 1]  # the order of the rewards
    ac.reward = _Table([0.5, 0.5, 0.5, 0.5])
    ac.learner.value = lambda features: torch.linspace(-1, 1, next(iter(features.values())).shape[0])
    weights = ac.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(1)).actor[5]
    assert (weights[1:] < weights[:-1]).all(), weights


def test_the_checkpoint_state_restores_critic_replay_and_counters(tiny_models):
    ac = _acflow(tiny_models)
    ac.collect(["a red circle"], torch.Generator().manual_seed(0))
    ac.after_optimizer_step()
    state, own = ac.state_dict(), ac.process_state_dict()
    assert "replay" not in state["learner"] and set(own) == {"replay"}  # each process its own samples
    other = _acflow(tiny_models)
    other.load_state_dict(state)
    other.load_process_state_dict(own)
    x = torch.randn(2, *ac.backbone.latent_shape())
    t, cond = torch.tensor([500.0, 900.0]), ac.backbone.encode_prompts(["a", "b"], guidance=False)
    torch.testing.assert_close(other.learner(x, t, cond), ac.learner(x, t, cond))
    assert torch.equal(other.learner.replay["x"], ac.learner.replay["x"]) and other.optimizer_steps == 1
    assert other.learner.running.count == ac.learner.running.count
    # and both continue identically
    a = ac.collect(["a blue square"], torch.Generator().manual_seed(3))
    b = other.collect(["a blue square"], torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.actor[5], b.actor[5])


def test_configuration_errors(tiny_models):
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        ACFlowConfig(shaping="prompt", samples_per_prompt=1)
    with pytest.raises(ValueError, match="beta"):
        ACFlowConfig(beta=0)
    backbone = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="lora"), "cpu")
    with pytest.raises(ValueError, match="needs a reward"):
        ACFlow(ACFlowConfig(), backbone, None, SampleConfig(num_steps=3))
    frozen = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="none"), "cpu")
    with pytest.raises(ValueError, match="finetune"):
        ACFlow(ACFlowConfig(), frozen, SimpleNamespace(), SampleConfig(num_steps=3))


def test_trajectory_coupling_regresses_onto_each_samples_own_noise(tiny_models):
    """coupling: trajectory -> x_t = (1 - sigma) x_1 + sigma x_T with the sample's own initial noise,
    and the target is x_T - x_1 (the pair the sampler coupled)."""
    ac = _acflow(tiny_models, coupling="trajectory", critic_warmup=0, timesteps_per_sample=2)
    generator = torch.Generator().manual_seed(0)
    recorded = {}
    original = ac.scored_rollout

    def keep(*args, **kwargs):
        recorded["trajectory"], rewards, shaped = original(*args, **kwargs)
        return recorded["trajectory"], rewards, shaped

    ac.scored_rollout = keep
    x_t, timesteps, cond, target, reference, weights = ac.collect(["a red circle", "a blue square"], generator).actor
    trajectory = recorded["trajectory"]
    noise, x1 = trajectory.latents[0].float().repeat(2, 1, 1, 1), trajectory.final.float().repeat(2, 1, 1, 1)
    torch.testing.assert_close(target, noise - x1)
    sigma = (timesteps.float() / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sigma) * x1 + sigma * noise, rtol=1e-4, atol=1e-5)
