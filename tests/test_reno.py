"""ReNO: the noise-norm regulariser by hand, the optimisation loop (batched, best kept, per-sample
clipping, early stop) on a tiny backbone, and the CLI's outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from genalign.cli import main
from genalign.core.experiment import BackboneConfig
from genalign.core.sampler import sample
from genalign.finetuners.reno import RenoConfig, noise_regularizer, reno
from genalign.pipelines import load_backbone


def test_noise_regularizer_by_hand():
    """n = (3, 4): ||n|| = 5, d = 2: 0.5 * 25 - 1 * log 5 = 12.5 - 1.6094379 = 10.8905621."""
    assert noise_regularizer(torch.tensor([[3.0, 4.0]])).tolist() == pytest.approx([10.8905621], abs=1e-5)


def test_noise_regularizer_is_minimal_at_sqrt_d_minus_1():
    """d/dr (0.5 r^2 - (d - 1) log r) = r - (d - 1) / r = 0 at r = sqrt(d - 1)."""
    d = 64
    direction = torch.nn.functional.normalize(torch.randn(1, d), dim=1)
    radii = torch.linspace(2.0, 14.0, 1201)
    values = noise_regularizer(direction * radii[:, None])
    assert radii[values.argmin()].item() == pytest.approx(math.sqrt(d - 1), abs=0.02)


class _Brightness:
    """Differentiable: mean pixel value."""

    differentiable = True

    def __call__(self, images, prompts, metadata=None):
        scores = images.flatten(1).mean(1)
        return scores, {"brightness": scores}


@pytest.fixture()
def backbone(tiny_models):
    return load_backbone(BackboneConfig(family="sd-turbo", path=tiny_models("sd-turbo"), finetune="none"), "cpu")


def test_reno_raises_the_reward_and_keeps_the_best(backbone):
    config = RenoConfig(num_steps=1, iterations=8, lr=5.0, seeds_per_prompt=2)
    calls = []

    class _Counting(_Brightness):
        def __call__(self, images, prompts, metadata=None):
            calls.append(len(prompts))
            return super().__call__(images, prompts, metadata)

    result = reno(backbone, _Counting(), ["a", "b"], config, torch.Generator().manual_seed(0))
    assert result.images.shape[0] == 2 and result.noise.shape[0] == 2
    assert (result.best_reward > result.initial_reward).all()
    assert calls == [4] * 8 and result.iterations_run == 8  # exactly `iterations` evaluations, as the official loop
    history = torch.tensor(result.history)  # (evaluations, prompts * seeds)
    assert history.shape == (8, 4)
    best_of_prompt = history.view(8, 2, 2).amax(dim=(0, 2))
    torch.testing.assert_close(result.best_reward, best_of_prompt)  # the best over iterations and seeds
    # the returned noise regenerates the returned image
    cond = backbone.encode_prompts(["a", "b"], guidance=False)
    again = backbone.decode(sample(backbone, cond, 1, latents=result.noise).final)
    torch.testing.assert_close(again.float().clamp(0, 1), result.images, atol=1e-4, rtol=1e-4)


def test_batched_reno_equals_one_prompt_at_a_time(backbone):
    """Per-sample clipping keeps samples independent: a batch gives each prompt its lone result."""
    config = RenoConfig(num_steps=1, iterations=3)
    noise = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(0))
    together = reno(backbone, _Brightness(), ["a", "b"], config, noise=noise)
    alone = reno(backbone, _Brightness(), ["b"], config, noise=noise[1:])
    torch.testing.assert_close(together.noise[1:], alone.noise, atol=1e-5, rtol=1e-5)


def test_the_regulariser_acts_inside_the_loop(backbone):
    """A reward with no gradient (it only counts up, so the latest noise is the best): one plain SGD step
    (no momentum, no clip, lr 0.5, lambda 0.2) is the regulariser's gradient alone,
    n - lr * lambda * (n - (d - 1) n / ||n||^2), computed here by hand; it pulls a noise of norm
    2 sqrt(d) toward sqrt(d - 1)."""
    count = []

    class _CountingUp(_Brightness):
        def __call__(self, images, prompts, metadata=None):
            count.append(1)
            scores = images.mean(dim=(1, 2, 3)) * 0.0 + float(len(count))
            return scores, {"up": scores}

    start = torch.randn(1, *backbone.latent_shape(), generator=torch.Generator().manual_seed(0))
    d = start[0].numel()
    start = start / start.norm() * 2 * math.sqrt(d)
    config = RenoConfig(num_steps=1, iterations=2, lr=0.5, momentum=0.0, grad_clip=0.0, reg_weight=0.2)
    result = reno(backbone, _CountingUp(), ["a"], config, noise=start)
    norm_sq = start.double().pow(2).sum()
    expected = start.double() - 0.5 * 0.2 * (start.double() - (d - 1) * start.double() / norm_sq)
    torch.testing.assert_close(result.noise.double(), expected, atol=1e-4, rtol=1e-5)
    assert math.sqrt(d - 1) < result.noise.norm() < start.norm()


def test_adam_takes_the_official_eps():
    """Adam's first step is lr * g / (|g| + eps) (bias corrections cancel): with ReNO's eps 1e-2 a
    clipped gradient element of 1e-3 moves by 5 * 1e-3 / 1.1e-2 = 0.4545, not by lr = 5 (eps 1e-8)."""
    from genalign.finetuners.reno import make_optimizer

    noise = torch.zeros(3, requires_grad=True)
    optimizer = make_optimizer(noise, RenoConfig(optimizer="adam", lr=5.0))
    noise.grad = torch.tensor([1e-3, -1e-3, 1e-1])
    optimizer.step()
    assert noise.detach().tolist() == pytest.approx([-5e-3 / 1.1e-2, 5e-3 / 1.1e-2, -0.5 / 0.11], rel=1e-4)


def test_early_stopping_and_refusals(backbone):
    class _Flat(_Brightness):
        def __call__(self, images, prompts, metadata=None):
            scores = images.mean(dim=(1, 2, 3)) * 0.0
            return scores, {"flat": scores}

    result = reno(backbone, _Flat(), ["a"], RenoConfig(iterations=20, patience=3), torch.Generator().manual_seed(0))
    assert result.iterations_run == 4  # no improvement after the start: stops after 3 more evaluations

    class _Frozen(_Brightness):
        differentiable = False

    with pytest.raises(ValueError, match="differentiable reward"):
        reno(backbone, _Frozen(), ["a"], RenoConfig(iterations=1))


def test_reno_cli_writes_images_noise_and_history(tiny_models, tmp_path):
    from tests.reward_models import save_tiny_transformers_clip

    clip = save_tiny_transformers_clip(tmp_path / "clip", image_size=16)
    out = tmp_path / "reno"
    assert main(["reno", "--backbone", tiny_models("sd-turbo"), "--family", "sd-turbo", "--prompt", "a red circle",
                 "--prompt", "a blue square", "--reward", "clip", "--reward-path", str(clip), "--iterations", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "reno.json").read_text())
    assert len(summary["reward_best"]) == 2
    assert all(b >= i for b, i in zip(summary["reward_best"], summary["reward_initial"]))
    assert len(summary["history"][0]) == 2  # 2 evaluations: the start and one step
    assert (out / "images" / "0001.png").is_file() and (out / "noise.safetensors").is_file()


def test_reno_through_the_rollout_is_the_sampler_bit_for_bit(monkeypatch):
    """ReNO's images come from the one rollout; its noise gradients must be those of the sampler
    called on the noise itself. On the shapes model with the CLIP reward a sliced view of the
    noise (the rollout's chunking, even for one chunk) moved the third iteration's reward in its
    sixth digit."""
    from pathlib import Path

    import genalign.finetuners.reno as module
    from genalign.core.experiment import RewardConfig
    from genalign.rewards import build_reward

    root = Path(__file__).resolve().parent.parent / "models" / "shapes"
    reward = build_reward([RewardConfig(name="clip", path=str(root / "clip"))], "cpu")
    backbone = load_backbone(BackboneConfig(family="sd", path=str(root / "sd"), finetune="none"), "cpu")
    config = RenoConfig(num_steps=2, guidance_scale=2.0, iterations=3)

    def run():
        return reno(backbone, reward, ["a red circle", "two blue squares"], config,
                    torch.Generator().manual_seed(0)).history

    through_rollout = run()

    def direct(backbone, prompts, cond, noise, config):
        trajectory = sample(backbone, cond, config.num_steps, config.guidance_scale, latents=noise, grad_last_k=-1)
        return backbone.decode(trajectory.final).float().clamp(0, 1)

    monkeypatch.setattr(module, "_generate", direct)
    assert through_rollout == run()
