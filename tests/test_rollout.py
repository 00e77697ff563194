"""The one rollout recipe (genalign.core.rollout) against the recipe written out by hand with the
sampler's own pieces, and its options: per-image seeds, shared noise, chunking, given latents."""

from __future__ import annotations

import pytest
import torch

from genalign.core.experiment import BackboneConfig
from genalign.core.rollout import draw_noise, repeat_prompts, rollout
from genalign.core.sampler import sample
from genalign.pipelines import load_backbone

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module")
def backbone(tiny_models):
    return load_backbone(BackboneConfig(family="sd", path=str(tiny_models("sd")), finetune="none"))


def _by_hand(backbone, prompts, k, steps, guidance, eta, seed):
    """repeat, draw noise (B, C, h, w) from the generator, encode, sample, decode."""
    generator = torch.Generator().manual_seed(seed)
    repeated = [p for p in prompts for _ in range(k)]
    shape = (len(repeated), *backbone.latent_shape())
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    cond = backbone.encode_prompts(repeated, guidance=guidance != 1.0)
    trajectory = sample(backbone, cond, steps, guidance, eta, latents=noise, generator=generator)
    return trajectory, backbone.decode(trajectory.final)


@torch.no_grad()
def test_the_rollout_is_the_recipe_written_out(backbone):
    reference, images = _by_hand(backbone, PROMPTS, 2, 3, 2.0, 1.0, seed=5)
    r = rollout(backbone, PROMPTS, 3, 2.0, 1.0, samples_per_prompt=2, generator=torch.Generator().manual_seed(5))
    assert r.prompts == ["a red circle"] * 2 + ["two blue squares"] * 2 + ["a green triangle"] * 2
    assert torch.equal(r.trajectory.latents, reference.latents)
    assert torch.equal(r.trajectory.log_probs, reference.log_probs)
    assert torch.equal(r.images, images)
    assert r.stochastic_steps == [i for i in range(3) if bool((reference.stds[i] > 0).any())]
    assert r.stochastic_steps  # eta 1: DDIM's steps but the last have noise


@torch.no_grad()
def test_seeded_images_do_not_depend_on_the_batch(backbone):
    seeds = [11, 12, 13]
    whole = rollout(backbone, PROMPTS, 3, 2.0, seeds=seeds).images
    alone = rollout(backbone, PROMPTS[1:2], 3, 2.0, seeds=seeds[1:2]).images
    torch.testing.assert_close(whole[1:2], alone, rtol=0, atol=1e-5)  # batched kernels round differently
    assert (whole[0] - whole[1]).abs().max() > 0.01
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        draw_noise(backbone, 3, seeds=[1, 2])


@torch.no_grad()
def test_shared_noise_starts_a_prompts_samples_together(backbone):
    r = rollout(backbone, PROMPTS[:2], 3, 1.0, 1.0, samples_per_prompt=3, shared_noise=True,
                generator=torch.Generator().manual_seed(0))
    start = r.trajectory.latents[0]
    assert torch.equal(start[0], start[1]) and torch.equal(start[1], start[2]) and not torch.equal(start[2], start[3])
    assert not torch.equal(r.images[0], r.images[1])  # the stochastic steps make them differ


@torch.no_grad()
def test_chunked_deterministic_rollouts_equal_the_whole_batch(backbone):
    whole = rollout(backbone, PROMPTS, 3, 2.0, samples_per_prompt=2, generator=torch.Generator().manual_seed(3))
    chunked = rollout(backbone, PROMPTS, 3, 2.0, samples_per_prompt=2, generator=torch.Generator().manual_seed(3),
                      chunk_size=4)
    torch.testing.assert_close(chunked.images, whole.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.trajectory.latents, whole.trajectory.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.trajectory.means, whole.trajectory.means, rtol=0, atol=1e-5)  # kept per image
    assert chunked.trajectory.stds.shape == whole.trajectory.stds.shape


def test_given_latents_give_gradients_to_the_noise(backbone):
    noise = draw_noise(backbone, 2, torch.Generator().manual_seed(0)).requires_grad_(True)
    r = rollout(backbone, PROMPTS[:2], 2, 1.0, latents=noise, grad_last_k=-1)
    r.images.mean().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0
    assert repeat_prompts(["a", "b"], 2) == ["a", "a", "b", "b"]
    with pytest.raises(ValueError, match="2 initial latents for 4 images"):
        rollout(backbone, PROMPTS[:2], 2, 1.0, samples_per_prompt=2, latents=noise.detach())
