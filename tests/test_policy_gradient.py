"""DDPO and Flow-GRPO: the PPO-clip objective, the Gaussian step KL and the group advantages against
hand-computed values and their limits; rollouts, minibatch cadence, checkpoint state and training
steps on tiny diffusion and flow backbones with non-differentiable rewards; the shipped configs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from genalign.core.config import ConfigError
from genalign.core.experiment import BackboneConfig, RewardConfig, SampleConfig, load_experiment
from genalign.core.normalize import PerPromptStatTracker
from genalign.finetuners import config_classes
from genalign.finetuners.ddpo import DDPO, DDPOConfig, batch_advantages, ddpo_loss
from genalign.finetuners.flow_grpo import FlowGRPO, FlowGRPOConfig, flow_grpo_loss, group_advantages
from genalign.finetuners.policy_gradient import gaussian_step_kl, ppo_clip_loss, trained_steps
from genalign.pipelines import load_backbone
from tests.loss_parts import assert_backward_loss_matches_loss

T = torch.tensor
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models' ops are too small to gain from a second thread, and on 2 shared cores two
    threads contending with another process ran these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ------------------------------------------------------------------ the pure functions


def test_ppo_clip_loss_by_hand():
    """eps = 1e-4, log r = log of the ratios below, advantages clipped to [-5, 5]:
    0: r 1.00005, A  2 (inside the range)    -> max(-2.0001, -2.0001) = -2.0001
    1: r 1.0003,  A  1 (above, A favours it) -> max(-1.0003, -1.0001) = -1.0001 (clipped)
    2: r 1.0003,  A -1 (above, A opposes it) -> max( 1.0003,  1.0001) =  1.0003
    3: r 0.9997,  A  3 (below, A opposes)    -> max(-2.9991, -2.9997) = -2.9991
    4: r 0.9997,  A -1 (below, A favours it) -> max( 0.9997,  0.9999) =  0.9999 (clipped)
    5: r 1,       A  7 -> 5                  -> -5
    loss = (-2.0001 - 1.0001 + 1.0003 - 2.9991 + 0.9999 - 5) / 6 = -8.9991 / 6 = -1.49985;
    d loss / d log_prob = -A r / 6 where the unclipped branch is the max, else 0:
    [-0.333350, 0, 0.166717, -0.499850, 0, -0.833333]."""
    ratios = T([1.00005, 1.0003, 1.0003, 0.9997, 0.9997, 1.0], dtype=torch.float64)
    log_prob = ratios.log().clone().requires_grad_(True)
    advantages = T([2.0, 1.0, -1.0, 3.0, -1.0, 7.0])
    loss, stats = ppo_clip_loss(log_prob, torch.zeros(6, dtype=torch.float64), advantages, 1e-4, 5.0)
    assert loss.item() == pytest.approx(-1.49985, abs=1e-5)
    loss.backward()
    expected = [-0.333350, 0.0, 0.166717, -0.499850, 0.0, -0.833333]
    assert log_prob.grad.tolist() == pytest.approx(expected, abs=2e-5)
    assert stats["clipped"].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # |r - 1| > eps, as clipfrac counts
    assert ddpo_loss(ratios.log(), torch.zeros(6), advantages).item() == pytest.approx(-1.49985, abs=1e-5)


def test_ratio_one_gives_minus_mean_advantage_and_the_score_function():
    """r = 1 (policy = sampling policy): loss = -mean(A) and d loss / d log_prob_i = -A_i / B,
    DDPO_SF's score-function gradient."""
    old = torch.randn(4)
    log_prob = old.clone().requires_grad_(True)
    advantages = T([0.5, -1.5, 2.0, 1.0])
    loss, stats = ppo_clip_loss(log_prob, old, advantages)
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx((-advantages / 4).tolist(), abs=1e-6)
    assert stats["ratio"].tolist() == pytest.approx([1.0] * 4) and stats["approx_kl"].abs().max() == 0


def test_gaussian_step_kl_by_hand_and_at_the_reference():
    """means differ by 0.2 in every element, std 0.5: KL = 0.2^2 / (2 * 0.5^2) = 0.08 per sample;
    0 where policy and reference agree; std 0.5 * sqrt(0.1) (the step std with |dt| = 0.1): 0.8."""
    mean = torch.zeros(2, 3, 4, 4)
    shifted = mean + T([0.2, 0.0]).view(2, 1, 1, 1)
    assert gaussian_step_kl(shifted, mean, 0.5).tolist() == pytest.approx([0.08, 0.0], abs=1e-6)
    assert gaussian_step_kl(shifted, mean, 0.5 * math.sqrt(0.1)).tolist() == pytest.approx([0.8, 0.0], abs=1e-5)


def test_flow_grpo_loss_by_hand():
    """r = 1, A = [1, -1, 2] (clip 1.5 -> [1, -1, 1.5]): PPO part -mean(A) = -0.5; KL 0.08 per sample
    (means 0.2 apart, std 0.5), beta 0.04: + 0.0032 -> -0.4968. Without the means: -0.5. The KL's
    gradient pulls the policy mean toward the reference: d/d mu = beta * (mu - mu_ref) / s^2 / (B * D)."""
    log_prob = torch.zeros(3)
    mean_policy = torch.full((3, 2), 0.2, requires_grad=True)
    loss = flow_grpo_loss(log_prob, log_prob, T([1.0, -1.0, 2.0]), mean_policy, torch.zeros(3, 2), 0.5,
                          adv_clip_max=1.5, beta=0.04)
    assert loss.item() == pytest.approx(-0.4968, abs=1e-6)
    loss.backward()
    assert mean_policy.grad.flatten().tolist() == pytest.approx([0.04 * 0.2 / 0.25 / 6] * 6, abs=1e-7)
    assert flow_grpo_loss(log_prob, log_prob, T([1.0, -1.0, 2.0]), adv_clip_max=1.5).item() == pytest.approx(-0.5)


def test_group_advantages_by_hand():
    """rewards a: [1, 0], b: [0.5, 0.5]. Group b is all equal -> exactly 0. Batch std (population) of
    [1, 0, .5, .5] = sqrt(0.125) = 0.3535534: a -> +-0.5 / 0.3536534 = +-1.4138; with the group's own
    std 0.5: +-0.5 / 0.5001 = +-0.99980."""
    prompts, rewards = ["a", "a", "b", "b"], T([1.0, 0.0, 0.5, 0.5])
    assert group_advantages(rewards, prompts, global_std=True).tolist() == pytest.approx([1.41381, -1.41381, 0, 0], abs=1e-5)
    assert group_advantages(rewards, prompts, global_std=False).tolist() == pytest.approx([0.9998, -0.9998, 0, 0], abs=1e-5)
    assert group_advantages(rewards, prompts)[2:].tolist() == [0.0, 0.0]  # exactly: these are dropped
    # the group-std form is the stat tracker without history (GRPO normalisation), up to the epsilon
    noisy = torch.rand(6)
    names = ["x", "y", "x", "y", "x", "y"]
    tracker = PerPromptStatTracker(buffer_size=0, min_count=1).update(names, noisy)
    assert group_advantages(noisy, names, global_std=False, eps=1e-6).tolist() == pytest.approx(tracker.tolist(), abs=1e-4)


def test_batch_advantages_and_trained_steps():
    assert batch_advantages(T([1.0, 3.0])).tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)
    g = torch.Generator().manual_seed(0)
    assert trained_steps([0, 1, 2, 3], 1.0, "random", g) == [0, 1, 2, 3]
    assert trained_steps([0, 1, 2, 3, 4, 5, 6, 7, 8], 0.5, "first", g) == [0, 1, 2, 3, 4]
    subset = trained_steps(list(range(10)), 0.3, "random", g)
    assert len(subset) == 3 and subset == sorted(subset) and len(set(subset)) == 3


# ------------------------------------------------------------------ the methods on tiny backbones


class _BrightnessReward:
    """Non-differentiable (computed from detached pixels, as a JPEG size or a parser would be)."""

    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        scores = images.detach().float().flatten(1).mean(1).cpu()
        return scores, {"brightness": scores}


class _ConstantReward(_BrightnessReward):
    def __call__(self, images, prompts, metadata=None):
        scores = torch.ones(images.shape[0])
        return scores, {"constant": scores}


def _method(tiny_models, cls, config, family, eta, reward=None, steps=4):
    path = tiny_models(family, "flow" if family == "sd3" else "epsilon")
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family=family, path=path, finetune="lora", lora_rank=4), "cpu")
    experiment = SimpleNamespace(method=config, sample=SampleConfig(num_steps=steps, guidance_scale=2.0, eta=eta))
    return cls.build(experiment, backbone, reward if reward is not None else _BrightnessReward())


def _train(method, batch, lr, updates):
    optimizer = torch.optim.Adam(list(method.named_trainable_parameters().values()), lr=lr)
    for _ in range(updates):
        loss, _ = method.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _surrogate_gain(method, batch):
    """mean A * (log p_theta - log p_old) over the batch's samples and trained steps (> 0: the
    policy moved toward the steps of samples with positive advantage)."""
    rows, steps = batch.rows, batch.steps
    trajectory = method._minibatch_trajectory(rows)
    advantages = method.rollout["advantages"][rows]
    with torch.no_grad():
        log_ratio = torch.stack([method._step(trajectory, k)[0] - trajectory.log_probs[:, k] for k in steps], 1)
    return float((advantages[:, None] * log_ratio).mean())


def test_ddpo_on_a_diffusion_backbone(tiny_models):
    """At the first minibatch the recomputed log-probs equal the sampler's (ratio 1) and the loss is
    -mean(clipped A); a few updates on it raise the surrogate sum A log r; the minibatches of one
    rollout partition its samples and a new rollout starts when they are used up."""
    config = DDPOConfig(samples_per_prompt=2, minibatches=2, inner_epochs=2, clip_range=0.2, min_count=2)
    ddpo = _method(tiny_models, DDPO, config, "sd", 1.0)
    batches = [ddpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(i)) for i in range(2)]
    assert [float(b.metrics["new_rollout"]) for b in batches] == [1.0, 0.0]
    assert sorted(torch.cat([b.rows for b in batches]).tolist()) == [0, 1, 2, 3]
    first = batches[0]
    assert first.steps == [0, 1, 2, 3]  # every DDIM step has noise at eta 1 here
    loss, metrics = ddpo.loss(first)
    advantages = ddpo.rollout["advantages"][first.rows].clamp(-5, 5)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-4)
    assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-5) and metrics["clipfrac"].item() == 0.0
    assert _surrogate_gain(ddpo, first) == pytest.approx(0.0, abs=1e-5)
    _train(ddpo, first, lr=5e-3, updates=3)
    assert _surrogate_gain(ddpo, first) > 0
    assert ddpo.loss(first)[0].item() < loss.item()
    # two inner epochs of two minibatches: the rollout serves four micro-steps, then a new one starts
    more = [ddpo.collect(["a green triangle"], torch.Generator().manual_seed(5 + i)) for i in range(3)]
    assert [float(b.metrics["new_rollout"]) for b in more] == [0.0, 0.0, 1.0]
    assert ddpo.rollout["prompts"] == ["a green triangle"] * 2


def test_ddpo_tracks_rewards_per_prompt_across_rollouts(tiny_models):
    """With min_count 2 and one image a prompt, the first rollout uses the batch statistics; a prompt
    seen again is normalised by its own buffer."""
    ddpo = _method(tiny_models, DDPO, DDPOConfig(samples_per_prompt=1, minibatches=1, min_count=2), "sd", 1.0)
    ddpo.collect(["a", "b"], torch.Generator().manual_seed(0))
    rewards = ddpo.rollout["rewards"]
    expected = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    assert ddpo.rollout["advantages"].tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    ddpo.collect(["a", "b"], torch.Generator().manual_seed(1))
    buffer = torch.tensor(list(ddpo.tracker.buffers["a"]))
    expected = (ddpo.rollout["rewards"][0] - buffer.mean()) / (buffer.std(unbiased=False) + 1e-6)
    assert ddpo.rollout["advantages"][0].item() == pytest.approx(expected.item(), rel=1e-4)


def test_flow_grpo_on_a_flow_backbone_with_the_kl(tiny_models):
    """SDE rollouts of a flow model: the last step (into sigma = 0) is deterministic and never
    trained; at the start the policy is the reference (KL 0) and the loss is -mean(A); updates open
    a KL > 0 and raise the surrogate; kl_variance=sigma divides by s_t^2 = step var / |dt| (a KL
    |dt| times the step one)."""
    config = FlowGRPOConfig(samples_per_prompt=3, minibatches=1, clip_range=0.2, beta=0.04)
    grpo = _method(tiny_models, FlowGRPO, config, "sd3", 0.7)
    batch = grpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert batch.steps == [0, 1, 2]
    assert len(batch.rows) == 6
    loss, metrics = grpo.loss(batch)
    advantages = grpo.rollout["advantages"][batch.rows].clamp(-5, 5)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-4)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-10)
    _train(grpo, batch, lr=1e-2, updates=3)
    loss, metrics = grpo.loss(batch)
    assert metrics["kl"].item() > 0 and _surrogate_gain(grpo, batch) > 0
    # the official code's KL (the default): s_t = step std / sqrt(|dt|); step: the step's own std
    trajectory = grpo._minibatch_trajectory(batch.rows)
    std = grpo._step(trajectory, 1)[2]
    sigmas = grpo.backbone.schedule.sigmas(4)[1]
    ratio = (grpo.kl_std(trajectory, 1, std) / std).flatten()[0].item()
    assert ratio == pytest.approx(1 / math.sqrt(float(sigmas[1] - sigmas[2])), rel=1e-4)
    grpo.config.kl_variance = "step"
    assert torch.equal(grpo.kl_std(trajectory, 1, std), std)


def test_the_default_kl_is_the_official_codes_on_sd3s_schedule(tiny_models):
    """SD3's real 10-step schedule (diffusers' FlowMatchEulerDiscreteScheduler, shift 3), noise level
    0.7: the default KL of every trained step is yifan123/flow_grpo's ``train_sd3.py`` formula,
    mean((mu_theta - mu_ref)^2) / (2 std_dev_t^2) with ``sd3_sde_with_logprob``'s
    std_dev_t = 0.7 sqrt(sigma / (1 - sigma)) (sigmas[1] for the 1 - sigma at sigma = 1), computed
    here from the scheduler's sigmas; the step KL is 1/|dt| times it (4-25x on this schedule)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from genalign.core.schedules import FlowSchedule

    config = FlowGRPOConfig(samples_per_prompt=2, minibatches=1, clip_range=0.2)
    assert config.kl_variance == "sigma" and config.beta == 0.04
    grpo = _method(tiny_models, FlowGRPO, config, "sd3", 0.7, steps=10)
    grpo.backbone.schedule = FlowSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    batch = grpo.collect(["a red circle"], torch.Generator().manual_seed(0))
    _train(grpo, batch, lr=1e-2, updates=2)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(10)
    sigmas = reference.sigmas.double()
    trajectory = grpo._minibatch_trajectory(batch.rows)
    ratios = []
    for j in batch.steps:
        with torch.no_grad(), grpo.backbone.reference():
            mean_reference = grpo._step(trajectory, j)[1]
        with torch.no_grad():
            _, mean, std = grpo._step(trajectory, j)
        kl = gaussian_step_kl(mean, mean_reference, grpo.kl_std(trajectory, j, std))
        sigma = sigmas[j]
        std_dev_t = 0.7 * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))
        official = ((mean - mean_reference).double() ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
        assert float(official.min()) > 0
        assert kl.double().tolist() == pytest.approx(official.tolist(), rel=1e-3)
        step_kl = gaussian_step_kl(mean, mean_reference, std)
        ratios.append(float((step_kl / kl).mean()))
        assert ratios[-1] == pytest.approx(1 / float(sigmas[j] - sigmas[j + 1]), rel=1e-3)
    assert batch.steps == list(range(9)) and 3.5 < min(ratios) and max(ratios) < 26


def test_groups_with_equal_rewards_are_left_out(tiny_models):
    grpo = _method(tiny_models, FlowGRPO, FlowGRPOConfig(samples_per_prompt=2), "sd3", 0.7, _ConstantReward())
    batch = grpo.collect(["a red circle"], torch.Generator().manual_seed(0))
    assert len(batch.rows) == 0 and float(batch.metrics["kept"]) == 0.0
    loss, _ = grpo.loss(batch)
    assert loss.item() == 0.0 and loss.requires_grad


def test_a_real_non_differentiable_reward_and_shared_noise(tiny_models):
    """The JPEG compressibility reward (DDPO's task); ``same_initial_noise`` starts a group from one noise."""
    from genalign.rewards import build_reward

    reward = build_reward([RewardConfig(name="jpeg_compressibility")], "cpu")
    config = DDPOConfig(samples_per_prompt=2, minibatches=1, same_initial_noise=True, timestep_fraction=0.5)
    ddpo = _method(tiny_models, DDPO, config, "sd", 1.0, reward)
    batch = ddpo.collect(["a cat"], torch.Generator().manual_seed(0))
    assert torch.equal(ddpo.rollout["latents"][0, 0], ddpo.rollout["latents"][0, 1])
    assert not torch.equal(ddpo.rollout["latents"][-1, 0], ddpo.rollout["latents"][-1, 1])
    assert len(batch.steps) == 2
    loss, _ = ddpo.loss(batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ddpo.named_trainable_parameters().values())


def test_prompt_metadata_reaches_the_reward(tiny_models, tmp_path):
    """``prompt_metadata`` (GenEval-format rows): its prompts are the training prompts, each image's row
    is passed to the reward (what the geneval reward needs)."""
    rows = [{"prompt": "a photo of two dogs", "tag": "counting", "include": [{"class": "dog", "count": 2}]},
            {"prompt": "a photo of a cup", "tag": "single_object", "include": [{"class": "cup", "count": 1}]}]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    class Recording(_BrightnessReward):
        def __call__(self, images, prompts, metadata=None):
            seen.append([m["tag"] for m in metadata])
            return super().__call__(images, prompts, metadata)

    config = DDPOConfig(samples_per_prompt=2, minibatches=1, prompt_metadata=str(tmp_path / "meta.jsonl"))
    ddpo = _method(tiny_models, DDPO, config, "sd", 1.0, Recording())
    assert ddpo.training_data() == ["a photo of two dogs", "a photo of a cup"]
    ddpo.collect(["a photo of a cup", "a photo of two dogs"], torch.Generator().manual_seed(0))
    assert seen == [["single_object", "single_object", "counting", "counting"]]
    with pytest.raises(ConfigError, match="no row"):
        ddpo.collect(["a photo of a cat"], torch.Generator().manual_seed(1))


def test_checkpoint_state_round_trip(tiny_models, tmp_path):
    """The stat tracker (shared by all processes) and this process's unfinished rollout go into the
    checkpoint, in two files (loadable with weights_only=True); a method restored from them serves
    the same next minibatch and loss."""
    config = DDPOConfig(samples_per_prompt=2, minibatches=2, min_count=2)
    ddpo = _method(tiny_models, DDPO, config, "sd", 1.0)
    ddpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    torch.save(ddpo.state_dict(), tmp_path / "finetuner.pt")
    torch.save(ddpo.process_state_dict(), tmp_path / "finetuner-rank-0.pt")
    assert "rollout" not in ddpo.state_dict() and "tracker" not in ddpo.process_state_dict()
    expected = ddpo.collect(["unused"], torch.Generator().manual_seed(1))
    restored = _method(tiny_models, DDPO, config, "sd", 1.0)
    restored.load_state_dict(torch.load(tmp_path / "finetuner.pt", weights_only=True))
    restored.load_process_state_dict(torch.load(tmp_path / "finetuner-rank-0.pt", weights_only=True))
    batch = restored.collect(["unused"], torch.Generator().manual_seed(1))
    assert torch.equal(batch.rows, expected.rows) and batch.steps == expected.steps
    assert restored.loss(batch)[0].item() == pytest.approx(ddpo.loss(expected)[0].item(), abs=1e-6)
    assert restored.tracker.buffers == ddpo.tracker.buffers
    # a checkpoint from before the split held the rollout in finetuner.pt: it still loads
    legacy = _method(tiny_models, DDPO, config, "sd", 1.0)
    legacy.load_state_dict({**torch.load(tmp_path / "finetuner.pt", weights_only=True),
                            **torch.load(tmp_path / "finetuner-rank-0.pt", weights_only=True)})
    again = legacy.collect(["unused"], torch.Generator().manual_seed(1))
    assert torch.equal(again.rows, expected.rows) and legacy.tracker.buffers == ddpo.tracker.buffers


def test_settings_that_cannot_work_are_refused(tiny_models):
    with pytest.raises(ConfigError, match="sample.eta > 0"):
        _method(tiny_models, DDPO, DDPOConfig(), "sd", 0.0)
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        _method(tiny_models, FlowGRPO, FlowGRPOConfig(samples_per_prompt=1), "sd3", 0.7)
    with pytest.raises(ConfigError, match="kl_variance=sigma"):
        _method(tiny_models, FlowGRPO, FlowGRPOConfig(samples_per_prompt=2), "sd", 1.0)
    assert _method(tiny_models, FlowGRPO, FlowGRPOConfig(samples_per_prompt=2, kl_variance="step"), "sd", 1.0)
    with pytest.raises(ConfigError, match="clip_range"):
        DDPOConfig(clip_range=0.0)


def test_training_through_the_cli_and_exact_resume_mid_rollout(tiny_models, tmp_path):
    """`genalign train` with method.name flow_grpo: 3 optimizer steps, two of them on one rollout; a
    run resumed from the checkpoint after step 1 (half the rollout still to train on) ends with the
    same weights as the uninterrupted run."""
    from safetensors.torch import load_file

    from genalign.cli import main

    config = tmp_path / "flow_grpo.yaml"
    config.write_text(json.dumps({
        "backbone": {"family": "sd3", "path": tiny_models("sd3", "flow")},
        "reward": {"name": "jpeg_compressibility"},
        "method": {"name": "flow_grpo", "samples_per_prompt": 2, "eval_num_steps": 2, "beta": 0.01},
        "sample": {"num_steps": 3, "guidance_scale": 2.0, "eta": 0.7},
        "run": {"prompts": ["a red circle", "a blue square"], "steps": 3, "batch_size": 2, "tracker": "none",
                "output_dir": str(tmp_path / "run"), "lr": 1e-3, "checkpoint_every": 1},
    }))
    assert main(["train", str(config)]) == 0
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["new_rollout"] for row in log] == [1.0, 0.0, 1.0]
    step_1 = tmp_path / "run" / "checkpoints" / "step-000001"
    assert main(["train", str(config), f"run.output_dir={tmp_path / 'resumed'}", "--resume", str(step_1)]) == 0
    final = [load_file(str(tmp_path / d / "checkpoints" / "step-000003" / "trainable.safetensors"))
             for d in ("run", "resumed")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize("name", ["shapes/ddpo.yaml", "shapes/flow_grpo.yaml", "sd15_ddpo.yaml", "sd3_flow_grpo.yaml"])
def test_shipped_configs_load(name):
    experiment = load_experiment(ROOT / "configs" / name, config_classes())
    assert experiment.method_name in ("ddpo", "flow_grpo") and experiment.sample.eta > 0


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_backward_loss_gives_the_loss_and_gradient_of_the_whole_loss(tiny_models, beta):
    """The trainer's path, one backward per trained step (with and without the KL term's reference
    pass), equals loss().backward() of the summed loss."""
    config = DDPOConfig(samples_per_prompt=2, minibatches=1, inner_epochs=1, min_count=2, beta=beta)
    ddpo = _method(tiny_models, DDPO, config, "sd", 1.0)
    batch = ddpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ddpo.named_trainable_parameters().values():  # ratios away from 1: both PPO branches occur
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    metrics = assert_backward_loss_matches_loss(ddpo, batch, expected_parts=len(batch.steps))
    assert ("kl" in metrics) == (beta > 0)


# ------------------------------------------------------------------ the SDE window (Flow-GRPO-Fast, MixGRPO)


def test_a_per_step_eta_puts_noise_on_those_steps_only(tiny_models):
    """eta [0, 0.7, 0.7, 0]: steps 0 and 3 are the ODE's (the first lands where the deterministic
    sampler lands from the same noise), steps 1 and 2 have noise; the stored log-probs are the
    recomputed ones (log_probs_of reads each step's eta)."""
    from genalign.core.rollout import rollout
    from genalign.core.sampler import log_probs_of

    backbone = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="none"), "cpu")
    prompts = ["a red circle", "a blue square"]
    windowed = rollout(backbone, prompts, 4, 1.0, [0.0, 0.7, 0.7, 0.0], generator=torch.Generator().manual_seed(0))
    ode = rollout(backbone, prompts, 4, 1.0, 0.0, generator=torch.Generator().manual_seed(0))
    assert windowed.stochastic_steps == [1, 2] and windowed.trajectory.eta == [0.0, 0.7, 0.7, 0.0]
    torch.testing.assert_close(windowed.trajectory.latents[1], ode.trajectory.latents[1], rtol=0, atol=0)
    assert not torch.equal(windowed.trajectory.latents[2], ode.trajectory.latents[2])
    with torch.no_grad():
        again = log_probs_of(backbone, windowed.trajectory, [0, 1, 2])
    torch.testing.assert_close(again, windowed.trajectory.log_probs[:, :3], rtol=1e-4, atol=1e-4)
    assert (windowed.trajectory.log_probs[:, 0] == 0).all() and (windowed.trajectory.log_probs[:, 1] != 0).all()
    with pytest.raises(ValueError, match="3 per-step eta values for 4 steps"):
        rollout(backbone, prompts, 4, 1.0, [0.0, 0.7, 0.0])


def test_sde_window_positions_by_hand():
    from genalign.finetuners.flow_grpo import sde_window

    g = torch.Generator().manual_seed(0)
    # Flow-GRPO-Fast's SD3.5 setting: 10 steps, window 3 within [0, 5): starts 0, 1 or 2
    windows = {sde_window(10, 3, 0, 5, "random", 0, 25, g) for _ in range(60)}
    assert windows == {(0, 3), (1, 4), (2, 5)}
    # MixGRPO's progressive window (group 4, 25 iterations a group, overlap step 1, roll back):
    # one step on every 25 rollouts; at the end of steps 0 .. 8 (hi 0 -> 9) it shrinks: [6, 9), [7, 9),
    # [8, 9), then rolls back to [0, 4)
    progressive = [sde_window(10, 4, 0, 0, "progressive", i, 25, g) for i in (0, 24, 25, 50, 149, 150, 175, 200, 225)]
    assert progressive == [(0, 4), (0, 4), (1, 5), (2, 6), (5, 9), (6, 9), (7, 9), (8, 9), (0, 4)]
    assert sde_window(25, 4, 0, 15, "progressive", 14 * 25, 25, g) == (14, 15)  # MixGRPO's FLUX grid: 25 steps, 15 trained
    with pytest.raises(ConfigError, match="does not fit"):
        sde_window(4, 3, 1, 3, "random", 0, 25, g)


def test_flow_grpo_with_an_sde_window_trains_the_window_only(tiny_models):
    """A 2-step window among the 3 steps that can have noise: the rollout's noise and the trained
    steps are the window's, the first update's ratio is 1 (loss = -mean A), the progressive window
    moves with the rollouts and its clock is saved with the method's state."""
    config = FlowGRPOConfig(samples_per_prompt=3, minibatches=1, clip_range=0.2, beta=0.0, sde_window=2,
                            sde_window_strategy="progressive", sde_window_shift_every=1)
    grpo = _method(tiny_models, FlowGRPO, config, "sd3", 0.7)
    first = grpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert first.steps == [0, 1] and grpo.rollout["eta"] == [0.7, 0.7, 0.0, 0.0]
    assert float(first.metrics["first_stochastic_step"]) == 0.0
    loss, metrics = grpo.loss(first)
    advantages = grpo.rollout["advantages"][first.rows].clamp(-5, 5)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-4)
    assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-5)
    second = grpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    assert second.steps == [1, 2] and grpo.rollout["eta"] == [0.0, 0.7, 0.7, 0.0]
    assert grpo.state_dict()["rollouts_done"] == 2
    with pytest.raises(ConfigError, match="longer than the 3 steps"):
        _method(tiny_models, FlowGRPO, FlowGRPOConfig(sde_window=4), "sd3", 0.7)


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage", "zimage", "flux2-klein", "wan"])
def test_flow_grpo_on_cps_rollouts(tiny_models, family):
    """sample.sde: cps on each flow backbone: the rollouts' log-probs are recomputed exactly at the
    first update (ratio 1); the official code's sigma-scaled KL belongs to the plain SDE and is
    refused with CPS."""
    path = tiny_models(family, "flow")
    backbone = load_backbone(BackboneConfig(family=family, path=path, finetune="lora", lora_rank=4), "cpu")
    sample = SampleConfig(num_steps=4, guidance_scale=2.0, eta=0.8, sde="cps")
    config = FlowGRPOConfig(samples_per_prompt=3, minibatches=1, clip_range=0.2, beta=0.04, kl_variance="step")
    grpo = FlowGRPO.build(SimpleNamespace(method=config, sample=sample), backbone, _BrightnessReward())
    batch = grpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert batch.steps == [0, 1, 2]
    assert grpo.loss(batch)[1]["ratio"].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="with sample.sde: cps"):
        FlowGRPO.build(SimpleNamespace(method=FlowGRPOConfig(), sample=sample), backbone, _BrightnessReward())
    with pytest.raises(ConfigError, match="use sample.sde: cps_gaussian"):
        FlowGRPO.build(SimpleNamespace(method=FlowGRPOConfig(beta=0.0, ratio_norm=True), sample=sample), backbone,
                       _BrightnessReward())


# ------------------------------------------------------------------ GRPO-Guard


def test_ratio_norm_by_hand():
    """x' = mu_old + s eps with the true Gaussian log-probs averaged over dims: the normalised log r is
    mean_d(eps * (mu_theta - mu_old)), and for mu_theta = mu_old it is exactly 0 (the plain one too)."""
    from genalign.finetuners.flow_grpo import ratio_norm_log_ratio

    g = torch.Generator().manual_seed(0)
    s = 0.3
    mu_old, eps = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    mu_theta = mu_old + 0.05 * torch.randn(4, 8, generator=g)
    x = mu_old + s * eps

    def log_p(mu):  # mean over dims of log N(x; mu, s^2)
        return (-(x - mu) ** 2 / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)).mean(dim=1)

    std = torch.full((4, 8), s)
    got = ratio_norm_log_ratio(log_p(mu_theta), log_p(mu_old), mu_theta, mu_old, std)
    torch.testing.assert_close(got, (eps * (mu_theta - mu_old)).mean(dim=1), rtol=1e-5, atol=1e-6)
    assert ratio_norm_log_ratio(log_p(mu_old), log_p(mu_old), mu_old, mu_old, std).abs().max() == 0


def test_flow_grpo_with_grpo_guard(tiny_models):
    """ratio_norm: the rollout keeps its step means, the first update's normalised ratio is 1, and
    each step's loss is weighted by 1 / its length (the first update's loss is -mean(A) times the mean
    of those weights)."""
    config = FlowGRPOConfig(samples_per_prompt=3, minibatches=1, clip_range=0.2, beta=0.0, ratio_norm=True)
    grpo = _method(tiny_models, FlowGRPO, config, "sd3", 0.7)
    batch = grpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert grpo.rollout["means"].shape[:2] == (4, 6)
    loss, metrics = grpo.loss(batch)
    assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-6)
    sigmas = grpo.backbone.schedule.sigmas(4)[1]
    weights = [1 / float(sigmas[k] - sigmas[k + 1]) for k in batch.steps]
    advantages = grpo.rollout["advantages"][batch.rows].clamp(-5, 5)
    assert loss.item() == pytest.approx(-advantages.mean().item() * sum(weights) / len(weights), rel=1e-4)
    assert_backward_loss_matches_loss(grpo, batch, expected_parts=len(batch.steps))


@pytest.mark.parametrize("ratio_norm", [False, True])
def test_a_compiled_denoisers_rollout_log_probs_are_recomputed_by_the_training_pass(tiny_models, ratio_norm):
    """backbone.compile: rollouts and training passes take different graphs and round differently.
    Here the 'compiled' path is the eager module with its output scaled by 1 + 1e-2 (of the order of
    bf16 rounding; no real compile): the stored rollout log-probs differ from what the loss computes, so PPO's
    clip range 1e-4 clips samples at the first update; recomputed by the training pass, the first
    update's ratio is 1 and nothing is clipped (GRPO-Guard's stored step means too)."""
    from genalign.core.speed import CompiledDenoiser

    config = FlowGRPOConfig(samples_per_prompt=3, minibatches=1, clip_range=1e-4, beta=0.0, ratio_norm=ratio_norm)
    results = {}
    for recompute in (False, True):
        grpo = _method(tiny_models, FlowGRPO, config, "sd3", 0.7)
        module = grpo.backbone.unwrapped_denoiser
        wrapper = CompiledDenoiser(module, "sampling", warmup=0)
        wrapper.compiled = lambda *a, **k: (module(*a, **k)[0] * (1 + 1e-2),)  # noqa: B023
        grpo.backbone.denoiser = wrapper
        type(grpo).recomputes_old_log_probs = property(lambda self, r=recompute: r)
        try:
            batch = grpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
            _, metrics = grpo.loss(batch)
        finally:
            del type(grpo).recomputes_old_log_probs
        results[recompute] = metrics
    assert results[False]["clipfrac"].item() > 0.2  # the rounding difference alone clips
    assert results[True]["clipfrac"].item() == 0.0
    assert results[True]["ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert grpo.backbone.compiled == "sampling" and grpo.recomputes_old_log_probs  # what decides it, unpatched
