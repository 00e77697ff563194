"""SD3, FLUX, FLUX.2 [dev] and [klein], Qwen-Image, Z-Image and the editing backbones (FLUX.1 Kontext,
Qwen-Image-Edit and -Edit-2509 / 2511) on tiny models: pipeline parity, SDE rollouts, LoRA, inversion,
training; Wan's SDE rollouts and training too (its parity and the rest: tests/test_wan.py)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from genalign.core.experiment import BackboneConfig, RunConfig
from genalign.core.sampler import initial_noise, invert, log_probs_of, sample
from genalign.core.trainer import Trainer
from genalign.pipelines import load_backbone


def to_pil(image):
    from PIL import Image

    return Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())

PROMPTS = ["a photo of a red circle", "two blue squares"]
# tiny checkpoint -> backbone family
FAMILY = {"sd3": "sd3", "flux": "flux", "flux-schnell": "flux", "qwenimage": "qwenimage", "zimage": "zimage",
          "flux2": "flux2", "flux2-klein": "flux2-klein", "flux-kontext": "flux-kontext",
          "qwenimage-edit": "qwenimage-edit", "qwenimage-edit-plus": "qwenimage-edit-plus", "wan": "wan", "wan22": "wan",
          "wan22-ti2v": "wan"}
# Wan 2.2 A14B trains one expert: the low-noise one denoises the last steps, whose gradients tests check
LOAD_OPTIONS = {"wan22": {"expert": "low"}}
QWEN_EDITS = ("qwenimage-edit", "qwenimage-edit-plus")


def _sources(size: int) -> torch.Tensor:
    """The editing models' source images of PROMPTS: fixed random images (2, 3, size, size) in [0, 1]."""
    return torch.rand(len(PROMPTS), 3, size, size, generator=torch.Generator().manual_seed(77))


def _with_sources(backbone):
    """Editing backbones get a source image for each of PROMPTS, so every test runs them unchanged."""
    if backbone.takes_images:
        backbone.set_source_images(dict(zip(PROMPTS, _sources(backbone.resolution))))
    return backbone


def _tiny_source_areas(backbone):
    """The Qwen edit pipelines' source areas (1024 x 1024; the Plus VLM's 384 x 384) set to the tiny model's."""
    from contextlib import ExitStack

    stack = ExitStack()
    if backbone.config.family == "qwenimage-edit":
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

        area, original = backbone.source_area, module.calculate_dimensions
        stack.enter_context(mock.patch.object(module, "calculate_dimensions", lambda _, ratio: original(area, ratio)))
    else:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        stack.enter_context(mock.patch.object(module, "VAE_IMAGE_SIZE", backbone.source_area))
        stack.enter_context(mock.patch.object(module, "CONDITION_IMAGE_SIZE", backbone.condition_area))
    return stack


def _load(tiny_models, tiny, **kwargs):
    config = BackboneConfig(family=FAMILY[tiny], path=tiny_models(tiny), **{**LOAD_OPTIONS.get(tiny, {}), **kwargs})
    return _with_sources(load_backbone(config))


def _pipeline_latents(backbone, latents, steps, guidance):
    """Run the diffusers pipeline from the same noise; FLUX's takes and returns packed latents."""
    pipe = backbone.pipe
    if backbone.config.family in ("qwenimage", *QWEN_EDITS):  # true CFG needs a negative prompt
        b, c, h, w = latents.shape
        size = backbone.resolution
        cfg = {"negative_prompt": [" "] * len(PROMPTS), "true_cfg_scale": guidance} if guidance != 1.0 else {}
        packed = pipe._pack_latents(latents, b, c, h, w)
        if backbone.config.family in QWEN_EDITS:
            # one PIL source image and prompt a call, as documented (given a list, Qwen-Image-Edit resizes the
            # VAE's images but not the VLM's; the Plus pipeline takes batches of one); the source areas shrunk to
            # the tiny model's
            with _tiny_source_areas(backbone):
                cfg = {"negative_prompt": " ", "true_cfg_scale": guidance} if guidance != 1.0 else {}
                out = torch.cat([pipe(prompt=prompt, image=to_pil(source), latents=packed[i : i + 1],
                                      num_inference_steps=steps, height=size, width=size, output_type="latent",
                                      **cfg).images for i, (prompt, source) in enumerate(zip(PROMPTS, _sources(size)))])
        else:
            out = pipe(prompt=PROMPTS, latents=packed, num_inference_steps=steps, height=size, width=size,
                       output_type="latent", **cfg).images
        return pipe._unpack_latents(out, size, size, backbone.vae_scale_factor)[:, :, 0]
    if backbone.config.family in ("flux2", "flux2-klein"):
        size = backbone.resolution
        out = pipe(prompt=list(PROMPTS), latents=latents, num_inference_steps=steps, guidance_scale=guidance, height=size,
                   width=size, output_type="latent", text_encoder_out_layers=backbone.out_layers).images
        if out.ndim == 3:  # [dev] returns the packed latents (B, h w, C)
            return out.permute(0, 2, 1).reshape(latents.shape)
        mean, std = backbone._bn_stats(out)  # [klein] the VAE's: back to the patchified, normalised ones
        return (pipe._patchify_latents(out) - mean) / std
    if backbone.config.family == "zimage":  # its guidance g is cond + g (cond - uncond): genalign's w - 1
        size = backbone.resolution
        # (a copy: ZImagePipeline writes the chat-templated prompts into the list it is given)
        return pipe(list(PROMPTS), latents=latents, num_inference_steps=steps, guidance_scale=guidance - 1,
                    height=size, width=size, output_type="latent").images
    if hasattr(pipe, "_pack_latents"):
        b, c, h, w = latents.shape
        packed = pipe._pack_latents(latents, b, c, h, w)
        size = backbone.resolution
        # FLUX.1 Kontext: the source images as they are (tensors in [0, 1]), no resize to its preferred sizes
        edit = ({"image": _sources(size), "_auto_resize": False, "max_area": size * size}
                if backbone.config.family == "flux-kontext" else {})
        out = pipe(prompt=PROMPTS, latents=packed, num_inference_steps=steps, guidance_scale=guidance, height=size,
                   width=size, max_sequence_length=pipe.tokenizer_2.model_max_length, output_type="latent",
                   **edit).images
        return pipe._unpack_latents(out, size, size, backbone.vae_scale_factor)
    return pipe(PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent").images


@pytest.mark.parametrize(
    "tiny,steps,guidance",
    [("sd3", 8, 4.0), ("flux", 4, 3.5), ("flux-schnell", 1, 1.0), ("flux-schnell", 4, 1.0), ("qwenimage", 4, 4.0),
     ("qwenimage", 4, 1.0), ("zimage", 4, 4.0), ("zimage", 4, 1.0),
     ("flux2-klein", 4, 4.0), ("flux2-klein", 4, 1.0), ("flux2-klein", 8, 4.0),  # FLUX.2's mu depends on N
     ("flux2", 4, 4.0), ("flux-kontext", 4, 2.5), ("qwenimage-edit", 4, 4.0), ("qwenimage-edit", 4, 1.0),
     ("qwenimage-edit-plus", 4, 4.0), ("qwenimage-edit-plus", 4, 1.0)],
)
def test_ode_sampler_reproduces_the_diffusers_pipeline(tiny_models, tiny, steps, guidance):
    backbone = _load(tiny_models, tiny, finetune="none")
    assert backbone.parameterisation == "flow"
    latents = initial_noise(backbone, len(PROMPTS), torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS, guidance=guidance != 1.0)
        ours = sample(backbone, cond, steps, guidance, latents=latents).final
        ref = _pipeline_latents(backbone, latents, steps, guidance)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    timesteps = backbone.schedule.timesteps(steps)
    assert timesteps[0] == 1000.0 and len(timesteps) == steps


@pytest.mark.parametrize("tiny", ["sd3", "flux", "qwenimage", "zimage", "flux2-klein", "flux2", "flux-kontext", "qwenimage-edit",
                                  "qwenimage-edit-plus", "wan", "wan22", "wan22-ti2v"])
def test_sde_rollouts_log_probs_and_last_k_gradients(tiny_models, tiny):
    backbone = _load(tiny_models, tiny, finetune="lora")
    cond = backbone.encode_prompts(PROMPTS[:1], guidance=False)
    noise = initial_noise(backbone, 1, torch.Generator().manual_seed(1))
    traj = sample(backbone, cond, 5, 1.0, eta=0.7, latents=noise, generator=torch.Generator().manual_seed(2),
                  grad_last_k=2)
    backbone.decode(traj.final).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.trainable_parameters())
    with torch.no_grad():
        again = sample(backbone, cond, 5, 1.0, eta=0.7, latents=noise, generator=torch.Generator().manual_seed(2))
        rescored = log_probs_of(backbone, again, range(5))
        ode = sample(backbone, cond, 5, 1.0, eta=0.0, latents=noise).final
    torch.testing.assert_close(traj.final.detach(), again.final)
    torch.testing.assert_close(rescored, again.log_probs, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(again.log_probs).all() and (again.final - ode).abs().mean() > 1e-3  # really stochastic


@pytest.mark.parametrize("tiny", ["sd3", "flux", "qwenimage", "zimage", "flux2-klein", "flux2", "flux-kontext", "qwenimage-edit",
                                  "qwenimage-edit-plus"])
def test_lora_saved_by_genalign_loads_in_diffusers_and_gives_the_same_latents(tiny_models, tmp_path, tiny):
    backbone = _load(tiny_models, tiny, finetune="lora", lora_rank=4, lora_alpha=4.0)
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    guidance = 3.0
    latents = initial_noise(backbone, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS, guidance=tiny not in ("flux", "flux2", "flux-kontext"))
        ours = sample(backbone, cond, 4, guidance, latents=latents).final
        with backbone.reference():
            base = sample(backbone, cond, 4, guidance, latents=latents).final
    assert (ours - base).abs().max() > 1e-2
    backbone.save_lora(tmp_path)
    plain = _load(tiny_models, tiny, finetune="none")  # a fresh pipeline, then diffusers' own loader
    with torch.no_grad():
        before = _pipeline_latents(plain, latents, 4, guidance)
    plain.pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        after = _pipeline_latents(plain, latents, 4, guidance)
    torch.testing.assert_close(before, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiny", ["sd3", "flux"])
def test_flow_inversion_then_sampling_returns_the_start_latents(tiny_models, tiny):
    backbone = _load(tiny_models, tiny, finetune="none")
    cond = backbone.encode_prompts(PROMPTS, guidance=False)
    x0 = 0.5 * initial_noise(backbone, 2, torch.Generator().manual_seed(4))
    errors = {}
    with torch.no_grad():
        for steps in (10, 50):
            states = invert(backbone, x0, cond, steps)
            back = sample(backbone, cond, steps, 1.0, latents=states[0]).final
            errors[steps] = (back - x0).abs()
            assert states[0].std() > 0.7  # went to noise
    # measured: mean 0.007 (sd3) / 0.011 (flux) at 50 steps, 0.04 / 0.05 at 10
    assert errors[50].mean() < 0.02 and errors[50].max() < 0.15
    assert errors[50].mean() < 0.35 * errors[10].mean()


def test_flux_sizes_must_fit_the_packing(tiny_models):
    backbone = _load(tiny_models, "flux", finetune="none")
    assert backbone.latent_shape(16, 16) == (4, 8, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        backbone.latent_shape(18, 16)


@pytest.mark.parametrize("tiny", ["sd", "sd3", "flux", "qwenimage", "zimage", "flux2-klein", "flux2", "flux-kontext", "qwenimage-edit",
                                  "qwenimage-edit-plus", "wan"])
def test_one_finetuner_trains_every_family_without_branching(tiny_models, tmp_path, tiny):
    """ToyDenoising only calls the Backbone contract (encode, schedule noising/target, predict)."""
    from tests.toy import ToyDenoising

    family, path = FAMILY.get(tiny, tiny), tiny_models(tiny)
    torch.manual_seed(0)
    backbone = _with_sources(load_backbone(BackboneConfig(family=family, path=path, finetune="lora", lora_rank=4)))
    finetuner = ToyDenoising(ToyDenoising.Config(num_steps=2), backbone)
    held_out = finetuner.collect(PROMPTS * 8, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = finetuner.loss(held_out)[0].item()
    # (the tiny FLUX.2 starts slower: measured -0.2% after 12 steps, -12% after 40)
    steps = 40 if tiny.startswith("flux2") else 12
    run = RunConfig(output_dir=str(tmp_path), steps=steps, batch_size=8, lr=1e-2, tracker="none",
                    prompts=PROMPTS, checkpoint_every=0)
    result = Trainer(finetuner, run).train()
    with torch.no_grad():
        after = finetuner.loss(held_out)[0].item()
    assert len(result.history) == steps and all(torch.isfinite(torch.tensor([h["mse"] for h in result.history])))
    assert after < 0.98 * before, (before, after)  # it learns, measured on a fixed held-out batch
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("tiny", ["sd", "sd3", "flux", "qwenimage", "zimage", "flux2-klein", "flux-kontext", "qwenimage-edit",
                                  "qwenimage-edit-plus"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_models, tiny):
    grads = {}
    path = tiny_models(tiny)
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA init both times
        backbone = _with_sources(load_backbone(BackboneConfig(family=FAMILY.get(tiny, tiny), path=path,
                                                              finetune="lora", gradient_checkpointing=checkpointing)))
        with backbone.training():
            assert backbone.unwrapped_denoiser.is_gradient_checkpointing == checkpointing
            cond = backbone.encode_prompts(PROMPTS, guidance=False)
            x = initial_noise(backbone, 2, torch.Generator().manual_seed(5))
            t = backbone.schedule.timesteps(4)[1]
            backbone.predict(x, t, cond).pow(2).mean().backward()
        # (Qwen-Image's last block's text-stream output is unused: its LoRA gets no gradient)
        grads[checkpointing] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                          for p in backbone.trainable_parameters()])
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)


def test_flow_schedule_edges_and_training_timesteps(tiny_models):
    dev = _load(tiny_models, "flux", finetune="none")
    schedule = dev.schedule
    # training sigmas are shifted like sampling: FLUX [dev] uses mu, i.e. a shift of exp(mu)
    sigmas = schedule.sample_training_timesteps(20_000, torch.Generator().manual_seed(0)) / 1000
    expected_median = math.exp(schedule.mu) / (math.exp(schedule.mu) + 1)
    assert sigmas.median().item() == pytest.approx(expected_median, abs=0.01)
    # the step into sigma = 0 adds no noise; a 1-step schedule refuses SDE noise
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    last = schedule.timesteps(4)[-1]
    step = schedule.step(x, torch.zeros_like(x), last, 4, eta=0.7)
    assert torch.all(step.std == 0) and torch.all(step.log_prob == 0)
    with pytest.raises(ValueError, match="1-step"):
        schedule.step(x, torch.zeros_like(x), schedule.timesteps(1)[0], 1, eta=0.7)
    # per-sample timesteps get per-sample sigmas
    timesteps = schedule.timesteps(4)
    both = schedule.step(x, torch.ones_like(x), timesteps[[0, 2]], 4, eta=0.0).prev_sample
    for row, t in enumerate(timesteps[[0, 2]]):
        alone = schedule.step(x[row : row + 1], torch.ones_like(x[:1]), t, 4, eta=0.0).prev_sample
        torch.testing.assert_close(both[row : row + 1], alone)
    # the schedule's mu belongs to one resolution
    with pytest.raises(ValueError, match="backbone.resolution"):
        dev.predict(torch.randn(1, 4, 16, 16), timesteps[0], dev.encode_prompts(PROMPTS[:1]))


def test_qwenimage_guidance_is_true_cfg_with_the_norm_rescale_and_decodes_as_the_pipeline(tiny_models):
    """Qwen-Image's guidance by hand from two unguided predictions: neg + w (pos - neg), rescaled per
    packed token to the positive prediction's norm; decode as the pipeline's own output."""
    backbone = _load(tiny_models, "qwenimage", finetune="none")
    x = initial_noise(backbone, 2, torch.Generator().manual_seed(6))
    t = backbone.schedule.timesteps(4)[1]
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS, guidance=True)
        guided = backbone.predict(x, t, cond, guidance_scale=4.0)
        pos = backbone.predict(x, t, backbone.encode_prompts(PROMPTS, guidance=False))
        neg = backbone.predict(x, t, backbone.encode_prompts([" ", " "], guidance=False))
    b, c, h, w = x.shape
    pack = backbone.pipe._pack_latents
    pos_p, neg_p = pack(pos, b, c, h, w), pack(neg, b, c, h, w)
    combined = neg_p + 4.0 * (pos_p - neg_p)
    expected = combined * pos_p.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(pack(guided, b, c, h, w), expected, rtol=1e-5, atol=1e-5)
    assert (guided - (neg + 4.0 * (pos - neg))).abs().max() > 1e-3  # the rescale is not a no-op
    with torch.no_grad():
        latents = sample(backbone, cond, 4, 4.0, latents=x).final
        ours = backbone.decode(latents)
        ref = backbone.pipe(PROMPTS, latents=pack(x, b, c, h, w), num_inference_steps=4, height=16, width=16,
                            negative_prompt=[" ", " "], true_cfg_scale=4.0, output_type="pt").images
        again = backbone.decode(backbone.encode(ours))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert again.shape == ours.shape and (again - ours).abs().mean() < 0.2  # a random VAE: only the layout is exact


def test_editing_backbones_take_each_prompts_source_image(tiny_models, tmp_path):
    from PIL import Image

    backbone = _load(tiny_models, "flux-kontext", finetune="none")
    size = backbone.resolution
    latents = initial_noise(backbone, 2, torch.Generator().manual_seed(6))
    sources = _sources(size)
    with torch.no_grad():
        given = sample(backbone, backbone.encode_prompts(PROMPTS, images=sources), 3, 2.5, latents=latents).final
        known = sample(backbone, backbone.encode_prompts(PROMPTS), 3, 2.5, latents=latents).final
        other = sample(backbone, backbone.encode_prompts(PROMPTS, images=sources.flip(0)), 3, 2.5,
                       latents=latents).final
    torch.testing.assert_close(given, known)
    assert (other - given).abs().mean() > 1e-3  # the source image is read
    with pytest.raises(ValueError, match="has none"):
        backbone.encode_prompts(["a prompt without a source"])
    with pytest.raises(ValueError, match="source images"):
        backbone.encode_prompts(PROMPTS, images=sources[:1])
    with pytest.raises(ValueError, match="multiples of 4"):
        backbone.encode_prompts(PROMPTS, images=torch.rand(2, 3, size + 2, size))
    # the dataset form: JSONL rows of prompt / source image file, loaded with the backbone
    rows = []
    for index, (prompt, image) in enumerate(zip(PROMPTS, sources)):
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / f"{index}.png")
        rows.append(f'{{"prompt": "{prompt}", "source_image": "{index}.png"}}')
    (tmp_path / "edits.jsonl").write_text("\n".join(rows) + "\n")
    from_file = load_backbone(BackboneConfig(family="flux-kontext", path=tiny_models("flux-kontext"), finetune="none",
                                             source_images=str(tmp_path / "edits.jsonl")))
    torch.testing.assert_close(from_file.source_images[PROMPTS[1]], (sources[1] * 255).round() / 255)
    text_to_image = _load(tiny_models, "flux", finetune="none")
    with pytest.raises(ValueError, match="no source images"):
        text_to_image.encode_prompts(PROMPTS, images=sources)
    with pytest.raises(ValueError, match="not an editing one"):
        load_backbone(BackboneConfig(family="flux", path=tiny_models("flux"), source_images=str(tmp_path / "edits.jsonl")))


def test_qwen_image_edit_prompt_states_see_the_source_image(tiny_models):
    backbone = _load(tiny_models, "qwenimage-edit", finetune="none")
    sources = _sources(backbone.resolution)
    one = backbone.encode_prompts(PROMPTS, guidance=True, images=sources)
    other = backbone.encode_prompts(PROMPTS, guidance=True, images=sources.flip(0))
    assert (one.positive["prompt_embeds"][0] - other.positive["prompt_embeds"][0]).abs().max() > 1e-3
    # the negative prompt is encoded with the same source, and carries the same source tokens
    assert torch.equal(one.negative["image_latents"], one.positive["image_latents"])
    assert (one.negative["prompt_embeds"][0] - other.negative["prompt_embeds"][0]).abs().max() > 1e-3
