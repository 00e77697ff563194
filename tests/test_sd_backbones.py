"""SD-family backbones on tiny models: parity with diffusers pipelines, LoRA, reference, inversion."""

from __future__ import annotations

import pytest
import torch

from genalign.core.experiment import BackboneConfig
from genalign.core.sampler import initial_noise, invert, log_probs_of, sample
from genalign.core.types import Backbone
from genalign.pipelines import WeightsNotFoundError, load_backbone

PROMPTS = ["a photo of a red circle", "two blue squares"]


def _load(tiny_models, family, prediction_type="epsilon", **kwargs):
    path = tiny_models(family.replace("-turbo", "") + ("-turbo" if "turbo" in family else ""), prediction_type)
    return load_backbone(BackboneConfig(family=family, path=path, **kwargs))


@pytest.mark.parametrize(
    "family,prediction_type",
    [("sd", "epsilon"), ("sd", "v_prediction"), ("sdxl", "epsilon")],
)
def test_eta0_sampler_reproduces_the_diffusers_pipeline(tiny_models, family, prediction_type):
    backbone = _load(tiny_models, family, prediction_type, finetune="none")
    assert isinstance(backbone, Backbone)
    assert backbone.parameterisation == prediction_type
    latents = initial_noise(backbone, len(PROMPTS), torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        ours = sample(backbone, cond, num_steps=10, guidance_scale=4.0, latents=latents).final
        ref = backbone.pipe(PROMPTS, latents=latents, num_inference_steps=10, guidance_scale=4.0,
                            output_type="latent").images
    assert ours.abs().mean() > 0.1  # a real, non-trivial output
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # decode = the pipeline's own post-processing
    with torch.no_grad():
        images = backbone.decode(ours)
        pipe_images = backbone.pipe(PROMPTS, latents=latents, num_inference_steps=10, guidance_scale=4.0,
                                    output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, pipe_images, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd-turbo", "sdxl-turbo"])
@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_trailing_steps_match_the_euler_pipeline(tiny_models, family, steps):
    backbone = _load(tiny_models, family, finetune="none")
    scheduler = backbone.pipe.scheduler
    scheduler.set_timesteps(steps)
    assert backbone.schedule.timesteps(steps).tolist() == scheduler.timesteps.long().tolist()
    noise = initial_noise(backbone, 1, torch.Generator().manual_seed(1))
    # Euler starts from noise * init_noise_sigma in sigma space; the same point in VP space is
    # noise * init_noise_sigma / sqrt(sigma_max^2 + 1) (diffusers uses sigma_max, not sqrt(s^2+1)).
    vp_start = noise * scheduler.init_noise_sigma / (1 + scheduler.sigmas.max() ** 2).sqrt()
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS[:1], guidance=False)
        ours = sample(backbone, cond, steps, 1.0, latents=vp_start).final
        ref = backbone.pipe(PROMPTS[:1], latents=noise, num_inference_steps=steps, guidance_scale=1.0,
                            output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,alpha", [("sd", 4.0), ("sdxl", 4.0), ("sd", 16.0)])
def test_lora_saved_by_genalign_loads_in_diffusers_and_gives_the_same_images(tiny_models, tmp_path, family, alpha):
    """Also with alpha != rank: the saved file carries the LoRA config, so the scale survives.
    Sampled unmerged, as diffusers samples a loaded LoRA: with this LoRA much larger than the
    random weights it wraps, the merged product's rounding (each layer within 4e-7 of fp64, as the
    unmerged one) grows through 8 guided steps past the comparison's 1e-5."""
    backbone = _load(tiny_models, family, finetune="lora", lora_rank=4, lora_alpha=alpha, merge_lora=False)
    with torch.no_grad():  # move the LoRA away from its near-zero init so that it matters
        for p in backbone.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    latents = initial_noise(backbone, 2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        ours = sample(backbone, cond, 8, 3.0, latents=latents).final
        with backbone.reference():
            base = sample(backbone, cond, 8, 3.0, latents=latents).final
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the output
    backbone.save_lora(tmp_path)

    pipe = type(backbone.pipe).from_pretrained(tiny_models(family))  # a plain diffusers pipeline
    with torch.no_grad():
        plain = pipe(PROMPTS, latents=latents, num_inference_steps=8, guidance_scale=3.0, output_type="latent").images
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        loaded = pipe(PROMPTS, latents=latents, num_inference_steps=8, guidance_scale=3.0, output_type="latent").images
    torch.testing.assert_close(plain, base, rtol=1e-5, atol=1e-5)  # reference == the base weights
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-5)


def test_lora_trains_only_adapters_and_reference_has_no_second_copy(tiny_models):
    backbone = _load(tiny_models, "sd", finetune="lora", lora_rank=2)
    names = list(backbone.named_trainable_parameters())
    assert names and all("lora" in n for n in names)
    total = sum(p.numel() for p in backbone.pipe.unet.parameters())
    trainable = sum(p.numel() for p in backbone.trainable_parameters())
    assert trainable < 0.1 * total
    assert backbone._reference_copy is None


def test_full_finetune_reference_is_a_frozen_copy(tiny_models):
    backbone = _load(tiny_models, "sd", finetune="full")
    backbone.keep_reference()
    x = initial_noise(backbone, 1, torch.Generator().manual_seed(3))
    cond = backbone.encode_prompts(PROMPTS[:1], guidance=False)
    t = torch.tensor(500)
    before = backbone.predict(x, t, cond).detach()
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.01)
    after = backbone.predict(x, t, cond).detach()
    with backbone.reference():
        ref = backbone.predict(x, t, cond).detach()
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(ref, before)


def _fit_denoiser(backbone, cond, steps=150):
    """A few AdamW steps of the epsilon objective on Gaussian latents: a random UNet is no
    denoiser (its ODE is stiff), a briefly trained one behaves like a real model for inversion."""
    optimizer = torch.optim.AdamW(backbone.trainable_parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    cond8 = cond.select([0, 1] * 4)
    for _ in range(steps):
        x0, noise = 0.5 * torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
        t = backbone.schedule.sample_training_timesteps(8, g)
        x_t = backbone.schedule.add_noise(x0, noise, t)
        loss = ((backbone.predict(x_t, t, cond8) - backbone.schedule.training_target(x0, noise, t)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def test_inversion_then_sampling_returns_the_start_latents(tiny_models):
    backbone = _load(tiny_models, "sd", finetune="full")
    cond = backbone.encode_prompts(PROMPTS, guidance=False)
    assert _fit_denoiser(backbone, cond) < 0.3
    x0 = 0.5 * initial_noise(backbone, 2, torch.Generator().manual_seed(4))
    errors = {}
    with torch.no_grad():
        for steps in (10, 50):
            states = invert(backbone, x0, cond, num_steps=steps)
            assert states.shape == (steps + 1, *x0.shape)
            torch.testing.assert_close(states[-1], x0)
            assert 0.8 < states[0].std() < 1.2  # it really went to noise
            back = sample(backbone, cond, steps, 1.0, latents=states[0]).final
            errors[steps] = (back - x0).abs()
    # measured: max 0.08 / mean 0.014 at 50 steps, max 0.36 / mean 0.06 at 10 steps
    assert errors[50].max() < 0.15 and errors[50].mean() < 0.03, errors[50].max()
    assert errors[50].mean() < 0.5 * errors[10].mean()  # the discretisation error shrinks with steps


def test_gradients_flow_only_through_the_last_k_steps(tiny_models):
    backbone = _load(tiny_models, "sd", finetune="lora")
    cond = backbone.encode_prompts(PROMPTS[:1])
    noise = initial_noise(backbone, 1, torch.Generator().manual_seed(5))

    def run(k):
        latents = noise.clone().requires_grad_(True)
        traj = sample(backbone, cond, 6, 3.0, eta=1.0, latents=latents, generator=torch.Generator().manual_seed(6),
                      grad_last_k=k)
        backbone.decode(traj.final).mean().backward()
        lora_grad = sum(p.grad.abs().sum() for p in backbone.trainable_parameters() if p.grad is not None)
        backbone.pipe.unet.zero_grad(set_to_none=True)
        return traj, latents.grad, lora_grad

    traj_all, start_grad_all, lora_all = run(-1)
    traj_k, start_grad_k, lora_k = run(2)
    assert start_grad_all is not None and start_grad_all.abs().sum() > 0  # through every step
    assert start_grad_k is None or start_grad_k.abs().sum() == 0  # the graph starts at step 5 of 6
    assert lora_k > 0 and lora_all > 0
    with torch.no_grad():  # same numbers whatever the gradient setting
        again = sample(backbone, cond, 6, 3.0, eta=1.0, latents=noise, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(traj_k.final.detach(), again.final)
    torch.testing.assert_close(traj_all.log_probs.detach(), again.log_probs)
    assert again.log_probs.shape == (1, 6) and torch.isfinite(again.log_probs).all()
    with torch.no_grad():  # re-scoring the stored transitions gives the recorded log-probs
        rescored = log_probs_of(backbone, again, range(6))
    torch.testing.assert_close(rescored, again.log_probs, rtol=1e-4, atol=1e-4)


def test_decode_is_differentiable_and_encode_inverts_shapes(tiny_models):
    backbone = _load(tiny_models, "sd", finetune="none")
    latents = torch.randn(2, *backbone.latent_shape(), requires_grad=True)
    images = backbone.decode(latents)
    images.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert backbone.encode(images.detach()).shape == latents.shape
    with pytest.raises(ValueError, match="multiple"):
        backbone.latent_shape(15, 16)


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not-a-real/model-id"):
        load_backbone(BackboneConfig(family="sd", path="not-a-real/model-id"))
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path)):
        load_backbone(BackboneConfig(family="sd", path=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown backbone.family"):
        load_backbone(BackboneConfig(family="sd9", path=str(tmp_path)))


def test_bf16_weights_sample_finite_and_close_to_fp32(tiny_models):
    """In bf16, alpha_prod = 0.99915 rounds to 1; the step math must run in fp32 (it once gave NaN)."""
    images = {}
    for dtype in ("float32", "bfloat16"):
        backbone = _load(tiny_models, "sd", finetune="none", dtype=dtype)
        latents = initial_noise(backbone, 2, torch.Generator().manual_seed(7))
        with torch.no_grad():
            final = sample(backbone, backbone.encode_prompts(PROMPTS), 10, 4.0, latents=latents).final
            images[dtype] = backbone.decode(final)
        assert final.dtype == backbone.dtype
    assert torch.isfinite(images["bfloat16"]).all()
    assert (images["bfloat16"] - images["float32"]).abs().mean() < 0.05


def test_bf16_trajectory_log_probs_equal_their_rescoring(tiny_models):
    """The sampler scores the sample as stored (rounded to bf16), like log_probs_of does later."""
    backbone = _load(tiny_models, "sd", finetune="none", dtype="bfloat16")
    cond = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        traj = sample(backbone, cond, 6, 3.0, eta=1.0, generator=torch.Generator().manual_seed(8))
        rescored = log_probs_of(backbone, traj, range(6))
    assert traj.latents.dtype == torch.bfloat16
    torch.testing.assert_close(rescored, traj.log_probs, rtol=0, atol=1e-4)


def test_bf16_noising_keeps_small_noise_levels(tiny_models):
    backbone = _load(tiny_models, "sd", finetune="none")
    x0, noise = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    t = torch.tensor([0])
    exact = backbone.schedule.add_noise(x0, noise, t)
    half = backbone.schedule.add_noise(x0.bfloat16(), noise.bfloat16(), t)
    assert exact[0, 0, 0, 0].item() == pytest.approx(0.0292, abs=1e-3)  # sqrt(1 - 0.99915)
    assert half.dtype == torch.bfloat16 and half.float()[0, 0, 0, 0].item() == pytest.approx(0.0292, rel=0.01)


def test_lora_dropout_only_in_training_mode(tiny_models):
    backbone = _load(tiny_models, "sd", finetune="lora", lora_dropout=0.5)
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = initial_noise(backbone, 1, torch.Generator().manual_seed(9))
    cond = backbone.encode_prompts(PROMPTS[:1], guidance=False)
    t = torch.tensor(400)
    with torch.no_grad():
        torch.testing.assert_close(backbone.predict(x, t, cond), backbone.predict(x, t, cond))
        with backbone.training():
            assert (backbone.predict(x, t, cond) - backbone.predict(x, t, cond)).abs().max() > 1e-4
        torch.testing.assert_close(backbone.predict(x, t, cond), backbone.predict(x, t, cond))


def test_full_finetune_with_bf16_weights_predicts_without_autocast(tiny_models):
    backbone = _load(tiny_models, "sd", finetune="full", dtype="bfloat16")
    backbone.keep_reference()
    x = initial_noise(backbone, 1, torch.Generator().manual_seed(10))
    cond = backbone.encode_prompts(PROMPTS[:1], guidance=True)
    policy = backbone.predict(x, torch.tensor(300), cond, guidance_scale=2.0)
    with backbone.reference():
        reference = backbone.predict(x, torch.tensor(300), cond, guidance_scale=2.0)
    assert policy.dtype == torch.float32 and reference.dtype == torch.bfloat16
    assert (policy.float() - reference.float()).abs().mean() < 0.05


def test_euler_configs_end_the_chain_at_alpha_one():
    from diffusers import EulerDiscreteScheduler

    from genalign.core.schedules import DiffusionSchedule

    config = EulerDiscreteScheduler(timestep_spacing="trailing").config
    assert config.get("set_alpha_to_one") is False or "set_alpha_to_one" not in config
    assert DiffusionSchedule(config).final_alpha_cumprod == 1.0


def test_alpha_prod_is_looked_up_on_the_timesteps_device_without_a_round_trip_to_the_host():
    """A GPU run's timesteps live on the GPU: the lookup stays there (no host sync); the meta
    device stands in for it here (a copy to the host would fail on it)."""
    from diffusers import DDIMScheduler

    from genalign.core.schedules import DiffusionSchedule

    schedule = DiffusionSchedule(DDIMScheduler(beta_schedule="scaled_linear").config)
    t = torch.tensor([999, 500, 0, -1])
    values = schedule.alpha_prod(t)
    expected = torch.cat([DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod[[999, 500, 0]].double(),
                          torch.tensor([schedule.final_alpha_cumprod], dtype=torch.float64)])
    assert torch.equal(values, expected)
    on_device = schedule.alpha_prod(t.to("meta"))
    assert on_device.device.type == "meta" and on_device.shape == (4,)


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_a_too_long_prompt_is_reported_once_and_non_strings_are_refused(tiny_models, family, capsys):
    backbone = load_backbone(BackboneConfig(family=family, path=tiny_models(family), finetune="none"))
    long = " ".join(["a red circle left of a blue square"] * 20)
    for _ in range(3):
        backbone.encode_prompts([long, "a circle"], guidance=False)
    err = capsys.readouterr().err
    assert err.count("reported once") == 1 and "the rest is cut off" in err
    assert "truncated because" not in err  # diffusers' per-call warning is replaced by the one report
    with pytest.raises(TypeError, match="list of strings"):
        backbone.encode_prompts("a circle")
    with pytest.raises(TypeError, match="list of strings"):
        backbone.encode_prompts([None])


def test_empty_training_prompts_are_a_config_error():
    from genalign.core.config import ConfigError
    from genalign.core.experiment import RunConfig

    with pytest.raises(ConfigError, match=r"run.prompts\[1\] is empty"):
        RunConfig(prompts=["a circle", "  "]).load_prompts()


@pytest.mark.parametrize("family", ["flux"])  # the tiny SD3 has no T5 (its tokenizer_3 is absent)
def test_the_t5_tokenizer_is_held_to_max_sequence_length(tiny_models, family, capsys):
    """FLUX's T5 is tokenizer_2 (SD3's is tokenizer_3): it reads max_sequence_length tokens, whatever
    the CLIP tokenizer reads."""
    backbone = load_backbone(BackboneConfig(family=family, path=tiny_models(family), finetune="none",
                                            max_sequence_length=4))
    t5 = backbone.pipe.tokenizer_2 if family == "flux" else backbone.pipe.tokenizer_3
    prompt = "a red circle"
    assert len(backbone.pipe.tokenizer(prompt)["input_ids"]) <= backbone.pipe.tokenizer.model_max_length
    assert len(t5(prompt)["input_ids"]) > 4
    backbone.encode_prompts([prompt], guidance=False)
    err = capsys.readouterr().err
    name = "tokenizer_2" if family == "flux" else "tokenizer_3"
    assert f"{name} reads 4" in err
