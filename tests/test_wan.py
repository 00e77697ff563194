"""Wan 2.1 / 2.2 on tiny random models (pipelines/wan.py): pipeline parity step by step and decoded,
the two experts of Wan 2.2 A14B, LoRA export read by diffusers, checkpointing, image-to-video, and the
video reward contract (SDE rollouts and log-probs: tests/test_flow_backbones.py)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from genalign.core.experiment import BackboneConfig, RewardConfig
from genalign.core.sampler import initial_noise, sample
from genalign.pipelines import load_backbone

PROMPTS = ["a red circle moving to the right", "two blue squares"]
LAYOUTS = ("wan", "wan22", "wan22-ti2v")


def _load(tiny_models, tiny, **kwargs):
    return load_backbone(BackboneConfig(family="wan", path=tiny_models(tiny, "flow"), **kwargs))


@contextmanager
def _euler(pipe):
    """The pipeline with FlowMatchEulerDiscreteScheduler at its UniPC scheduler's flow_shift (what
    genalign samples with), put back afterwards."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    original = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=original.config.flow_shift,
                                                     num_train_timesteps=original.config.num_train_timesteps)
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def _pipeline(backbone, latents, steps, guidance, output_type="latent"):
    size = backbone.resolution
    with _euler(backbone.pipe) as pipe:
        return pipe(prompt=list(PROMPTS), latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                    height=size, width=size, num_frames=backbone.frames, output_type=output_type).frames


@pytest.mark.parametrize("tiny", LAYOUTS)
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_ode_sampler_and_decode_reproduce_the_wan_pipeline(tiny_models, tiny, guidance):
    backbone = _load(tiny_models, tiny, finetune="none")
    assert backbone.video and backbone.parameterisation == "flow" and backbone.frames == 9
    latents = initial_noise(backbone, 2, torch.Generator().manual_seed(0))
    assert latents.shape[1:3] == (4, 5)  # 9 frames -> 5 latent frames (temporal factor 2)
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS, guidance=guidance != 1.0)
        ours = sample(backbone, cond, 4, guidance, latents=latents).final
        ref = _pipeline(backbone, latents.clone(), 4, guidance)
        video = backbone.decode(ours)
        ref_video = _pipeline(backbone, latents.clone(), 4, guidance, output_type="pt")
    assert (ref - latents).abs().mean() > 0.1 and ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert video.shape == (2, 9, 3, 16, 16)
    torch.testing.assert_close(video, ref_video, rtol=1e-4, atol=1e-4)


def test_the_schedule_is_eulers_at_the_checkpoints_flow_shift(tiny_models):
    backbone = _load(tiny_models, "wan", finetune="none")
    sigmas = backbone.schedule.sigmas(4)[1]

    def shift(s):  # shift 3, the UniPC config's flow_shift
        return 3 * s / (1 + 2 * s)

    # FlowMatchEulerDiscreteScheduler: linspace from 1 to the smallest (shifted) training sigma, shifted
    plain = torch.linspace(1, shift(torch.tensor(1 / 1000)).item(), 4)
    torch.testing.assert_close(sigmas[:-1], shift(plain))
    assert sigmas[-1] == 0


def test_frames_are_checked_and_set_the_latent_frames(tiny_models):
    backbone = _load(tiny_models, "wan", finetune="none", frames=5)
    assert backbone.latent_shape() == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="frames - 1 divisible by 2"):
        _load(tiny_models, "wan", finetune="none", frames=4).latent_shape()
    with pytest.raises(ValueError, match="has one transformer"):
        _load(tiny_models, "wan", finetune="none", expert="low")


def test_encode_then_decode_keeps_the_video_shape(tiny_models):
    backbone = _load(tiny_models, "wan", finetune="none")
    video = torch.rand(1, 9, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = backbone.encode(video)
        assert latents.shape == (1, 4, 5, 8, 8)
        assert backbone.decode(latents).shape == video.shape
    with pytest.raises(ValueError, match="encodes videos"):
        backbone.encode(video[:, 0])


@pytest.mark.parametrize("expert", ["high", "low"])
def test_wan22_sends_each_sample_to_the_expert_of_its_timestep(tiny_models, expert):
    """A batch mixing timesteps above and below boundary_ratio * 1000 = 875: each row equals the
    pipeline's own expert called on it alone; only the trained expert has LoRA weights."""
    backbone = _load(tiny_models, "wan22", finetune="lora", expert=expert)
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    pipe = backbone.pipe
    trained = pipe.transformer if expert == "high" else pipe.transformer_2
    frozen = pipe.transformer_2 if expert == "high" else pipe.transformer
    assert backbone.unwrapped_denoiser is trained and not any(p.requires_grad for p in frozen.parameters())
    cond = backbone.encode_prompts(PROMPTS, guidance=False)
    x = initial_noise(backbone, 2, torch.Generator().manual_seed(4))
    t = torch.tensor([950.0, 400.0])
    with torch.no_grad():
        out = backbone.predict(x, t, cond)
        for i, module in enumerate((pipe.transformer, pipe.transformer_2)):
            alone = module(hidden_states=x[i : i + 1], timestep=t[i : i + 1],
                           encoder_hidden_states=cond.positive["prompt_embeds"][i : i + 1], return_dict=False)[0]
            torch.testing.assert_close(out[i : i + 1], alone)
        with backbone.reference():
            base = backbone.predict(x, t, cond)
    changed = 0 if expert == "high" else 1  # the row the trained (LoRA) expert denoised
    assert (out[changed] - base[changed]).abs().max() > 1e-3
    torch.testing.assert_close(out[1 - changed], base[1 - changed])


@pytest.mark.parametrize("tiny,expert", [("wan", None), ("wan22", "low")])
def test_lora_saved_by_genalign_loads_in_diffusers_and_gives_the_same_latents(tiny_models, tmp_path, tiny, expert):
    backbone = _load(tiny_models, tiny, finetune="lora", lora_rank=4, lora_alpha=4.0, expert=expert)
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    latents = initial_noise(backbone, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS, guidance=True)
        ours = sample(backbone, cond, 4, 3.0, latents=latents).final
        with backbone.reference():
            base = sample(backbone, cond, 4, 3.0, latents=latents).final
    assert (ours - base).abs().max() > 1e-2
    backbone.save_lora(tmp_path)
    plain = _load(tiny_models, tiny, finetune="none")
    with torch.no_grad():
        before = _pipeline(plain, latents.clone(), 4, 3.0)
    plain.pipe.load_lora_weights(str(tmp_path), **({"load_into_transformer_2": True} if expert == "low" else {}))
    with torch.no_grad():
        after = _pipeline(plain, latents.clone(), 4, 3.0)
    torch.testing.assert_close(before, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)
    again = _load(tiny_models, tiny, finetune="none", expert=expert)  # genalign's own loader: the same
    again.load_lora(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(sample(again, cond, 4, 3.0, latents=latents).final, ours, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_models):
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = _load(tiny_models, "wan", finetune="lora", gradient_checkpointing=checkpointing)
        with backbone.training():
            cond = backbone.encode_prompts(PROMPTS, guidance=False)
            x = initial_noise(backbone, 2, torch.Generator().manual_seed(5))
            backbone.predict(x, backbone.schedule.timesteps(4)[1], cond).pow(2).mean().backward()
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in backbone.trainable_parameters()])
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ rewards on videos


def _video(frames=5, seed=0):
    return torch.rand(2, frames, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_image_rewards_score_the_chosen_frames_and_reduce_them():
    """An image reward on a video: the frames ``frames`` picks, each with its video's prompt, reduced
    by mean or min; the reference is the same reward called on each frame by hand."""
    from genalign.rewards import load_reward
    from genalign.rewards.base import frame_indices

    video = _video()
    assert frame_indices(5, None) == [0, 1, 2, 3, 4] and frame_indices(5, 3) == [0, 2, 4]
    assert frame_indices(5, 1) == [2] and frame_indices(5, [0, -1]) == [0, 4]
    reward = load_reward(RewardConfig(name="jpeg_incompressibility", frames=3, frame_reduce="min"))
    scores, sub = reward(video, ["a", "b"])
    by_frame = torch.stack([reward(video[:, i], ["a", "b"])[0] for i in (0, 2, 4)], dim=1)
    torch.testing.assert_close(scores, by_frame.min(dim=1).values)
    torch.testing.assert_close(sub["jpeg_incompressibility"], scores)
    mean = load_reward(RewardConfig(name="jpeg_incompressibility"))(video, ["a", "b"])[0]
    every = torch.stack([reward(video[:, i], ["a", "b"])[0] for i in range(5)], dim=1)
    torch.testing.assert_close(mean, every.mean(dim=1))
    from genalign.rewards.base import RewardInputError

    with pytest.raises(RewardInputError, match="1 to 5"):
        load_reward(RewardConfig(name="jpeg_incompressibility", frames=6))(video, ["a", "b"])


def test_temporal_rewards_by_hand_and_their_gradients():
    from genalign.core.config import ConfigError
    from genalign.rewards import load_reward
    from genalign.rewards.base import RewardInputError

    still = torch.full((1, 4, 3, 2, 2), 0.5)
    moving = still.clone()
    moving[:, 1::2] = 0.75  # every second frame brighter: |change| = 0.25 at each of the 3 steps
    video = torch.cat([still, moving])
    flicker = load_reward(RewardConfig(name="flicker"))
    motion = load_reward(RewardConfig(name="motion"))
    torch.testing.assert_close(flicker(video, ["a", "b"])[0], torch.tensor([1.0, 0.75]))
    torch.testing.assert_close(motion(video, ["a", "b"])[0], torch.tensor([0.0, 0.25]))
    x = _video().requires_grad_(True)
    motion(x, ["a", "b"])[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(RewardInputError, match="scores videos"):
        flicker(video[:, 0], ["a", "b"])
    with pytest.raises(ConfigError, match="whole videos"):
        load_reward(RewardConfig(name="flicker", frames=2))


def test_frame_consistency_is_vbenchs_formula(tmp_path):
    """cos with the first and the previous frame, averaged over frames t >= 2, by hand on 3 frames of
    known embeddings; a video of one repeated frame scores 1."""
    from genalign.rewards import load_reward
    from genalign.rewards.video import consistency
    from tests.reward_models import save_tiny_transformers_clip

    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    c = 2 ** -0.5  # cos between [1, 1] and either axis
    expected = ((0.0 + 0.0) / 2 + (c + c) / 2) / 2
    torch.testing.assert_close(consistency(e), torch.tensor([expected]))
    path = save_tiny_transformers_clip(tmp_path / "clip")
    reward = load_reward(RewardConfig(name="frame_consistency", path=str(path)))
    frame = torch.rand(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    varied = torch.rand(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    scores = reward(torch.cat([frame.expand(1, 4, 3, 32, 32), varied]), ["a", "b"])[0]
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5) and scores[1] < 0.999
    embeds = reward.encoder.image_embeds(varied[0]).float()
    torch.testing.assert_close(scores[1:], consistency(embeds[None]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ methods and the training CLI on Wan


def test_reno_optimises_a_videos_noise_for_a_temporal_reward(tiny_models):
    from genalign.finetuners.reno import RenoConfig, reno
    from genalign.rewards import load_reward

    backbone = _load(tiny_models, "wan", finetune="none")
    result = reno(backbone, load_reward(RewardConfig(name="motion")), PROMPTS, RenoConfig(num_steps=2, iterations=4),
                  torch.Generator().manual_seed(0))
    assert result.images.shape == (2, 9, 3, 16, 16) and result.noise.shape == (2, 4, 5, 8, 8)
    assert (result.best_reward > result.initial_reward).all()


def test_flow_grpo_trains_wan_from_a_config_with_frame_and_video_rewards(tiny_models, tmp_path):
    """The training CLI on the tiny Wan: a weighted sum of a per-frame image reward (2 frames) and a
    temporal one; the sample grid has one row of 9 frames per prompt and the LoRA loads back."""
    import json

    import yaml
    from PIL import Image

    from genalign.cli import main

    config = {
        "backbone": {"family": "wan", "path": tiny_models("wan", "flow"), "finetune": "lora", "vae_tiling": True},
        "reward": [{"name": "jpeg_incompressibility", "frames": 2}, {"name": "flicker", "weight": 0.5}],
        "method": {"name": "flow_grpo", "samples_per_prompt": 2, "beta": 0.0},
        "sample": {"num_steps": 3, "guidance_scale": 1.0, "eta": 0.7},
        "run": {"output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "prompts": PROMPTS,
                "tracker": "none", "lr": 1e-3},
    }
    path = tmp_path / "wan.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["grad_norm"] > 0
    grid = Image.open(run / "samples" / "final.png")
    assert grid.size == (9 * 18 + 2, 2 * 18 + 2)  # torchvision's grid: 2 px padding, 9 frames a row
    backbone = _load(tiny_models, "wan", finetune="none")
    assert backbone.pipe.vae.use_tiling is False
    backbone.load_lora(run / "final")
    assert any("lora" in name for name, _ in backbone.pipe.transformer.named_parameters())


def test_the_sample_cli_writes_looping_gifs_at_the_frames_asked(tiny_models, tmp_path):
    from PIL import Image

    from genalign.cli import main

    out = tmp_path / "videos"
    args = ["sample", "--backbone", tiny_models("wan", "flow"), "--family", "wan", "--prompt", PROMPTS[0],
            "--prompt", PROMPTS[1], "--steps", "2", "--frames", "5", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    with Image.open(out / "0000.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (16, 16) and gif.info["loop"] == 0
    assert Image.open(out / "grid.png").size == (5 * 18 + 2, 2 * 18 + 2)
    assert (out / "prompts.tsv").read_text().splitlines()[1] == f"0001.gif\t{PROMPTS[1]}"
    with pytest.raises(ValueError, match="makes images, not videos"):
        load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), frames=5))


# ------------------------------------------------------------------ image-to-video


def _i2v_sources():
    """Two 8-bit source images (exactly what a PIL image holds), 16 x 16."""
    return (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(77)) * 255).round() / 255


@pytest.mark.parametrize("tiny", ["wan-i2v", "wan22-i2v"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_image_to_video_reproduces_the_pipeline_from_each_prompts_source_image(tiny_models, tiny, guidance):
    """WanImageToVideoPipeline, one prompt and its PIL source image a call (it takes one image a call),
    against genalign's rollout of both prompts with their sources (Wan 2.1: CLIP image states too)."""
    from genalign.core.images import to_pil_images

    backbone = load_backbone(BackboneConfig(family="wan-i2v", path=tiny_models(tiny, "flow"), finetune="none"))
    assert backbone.takes_images and backbone.video
    sources = _i2v_sources()
    backbone.set_source_images(dict(zip(PROMPTS, sources)))
    latents = initial_noise(backbone, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS, guidance=guidance != 1.0)
        assert ("image_embeds" in cond.positive) == (tiny == "wan-i2v")
        ours = sample(backbone, cond, 4, guidance, latents=latents).final
        with _euler(backbone.pipe) as pipe:
            ref = torch.cat([pipe(prompt=prompt, image=image, latents=latents[i : i + 1].clone(), num_inference_steps=4,
                                  guidance_scale=guidance, height=16, width=16, num_frames=9,
                                  output_type="latent").frames
                             for i, (prompt, image) in enumerate(zip(PROMPTS, to_pil_images(sources)))])
    assert (ref - latents).abs().mean() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    other = sample(backbone, backbone.encode_prompts(PROMPTS, guidance=guidance != 1.0, images=sources.flip(0)), 4,
                   guidance, latents=latents).final
    assert (other - ours).abs().mean() > 1e-3  # the source image matters


def test_image_to_video_lora_loads_in_diffusers_and_trains(tiny_models, tmp_path):
    from tests.toy import ToyDenoising

    backbone = load_backbone(BackboneConfig(family="wan-i2v", path=tiny_models("wan-i2v", "flow"), finetune="lora"))
    backbone.set_source_images(dict(zip(PROMPTS, _i2v_sources())))
    toy = ToyDenoising(ToyDenoising.Config(num_steps=2), backbone)
    batch = toy.collect(PROMPTS * 2, torch.Generator().manual_seed(0))
    loss, _ = toy.loss(batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.trainable_parameters())
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    backbone.save_lora(tmp_path)
    again = load_backbone(BackboneConfig(family="wan-i2v", path=tiny_models("wan-i2v", "flow"), finetune="none"))
    again.load_lora(tmp_path)
    again.set_source_images(dict(zip(PROMPTS, _i2v_sources())))
    latents = initial_noise(backbone, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine = sample(backbone, backbone.encode_prompts(PROMPTS, guidance=False), 3, 1.0, latents=latents).final
        loaded = sample(again, again.encode_prompts(PROMPTS, guidance=False), 3, 1.0, latents=latents).final
    torch.testing.assert_close(loaded, mine, rtol=1e-5, atol=1e-5)
