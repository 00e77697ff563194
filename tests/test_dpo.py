"""Diffusion-DPO and Inversion-DPO: the pure objectives against hand-computed values, preference
data (online ranking, Pick-a-Pic format offline), and training steps on tiny backbones that move
the policy the way the objective says."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from genalign.core.config import ConfigError
from genalign.core.experiment import BackboneConfig, SampleConfig
from genalign.core.sampler import sample
from genalign.core.types import Conditioning
from genalign.finetuners.common import per_sample_mse
from genalign.finetuners.diffusion_dpo import (
    DiffusionDPO,
    DiffusionDPOConfig,
    diffusion_dpo_loss,
    implicit_accuracy,
    timestep_balance_weights,
)
from genalign.finetuners.inversion_dpo import (
    InversionDPO,
    InversionDPOConfig,
    inversion_deviation,
    inversion_dpo_loss,
)
from genalign.finetuners.preference_data import load_pick_a_pic, offline_pairs, preference_rows, rank_pairs
from genalign.pipelines import load_backbone

T = torch.tensor

# ------------------------------------------------------------------ the objectives by hand


def test_diffusion_dpo_loss_by_hand():
    """err_w 0.10, err_l 0.20, ref 0.15 / 0.15, beta 10: margin = -10/2 * ((0.10 - 0.20) - 0) = 0.5,
    loss = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077. Second pair: err_w 0.3, err_l 0.1,
    ref 0.2 / 0.2: margin = -5 * 0.2 = -1, loss = log(1 + e) = 1.313262. Mean 0.893670."""
    loss = diffusion_dpo_loss(T([0.10, 0.3]), T([0.20, 0.1]), T([0.15, 0.2]), T([0.15, 0.2]), beta=10.0)
    assert loss.item() == pytest.approx((0.474077 + 1.313262) / 2, abs=1e-5)
    assert implicit_accuracy(T([0.10, 0.3]), T([0.20, 0.1]), T([0.15, 0.2]), T([0.15, 0.2])).item() == 0.5


def test_policy_equal_to_reference_gives_log_2_and_half_accuracy():
    errs_w, errs_l = torch.rand(6), torch.rand(6)
    assert diffusion_dpo_loss(errs_w, errs_l, errs_w, errs_l).item() == pytest.approx(math.log(2))
    assert implicit_accuracy(errs_w, errs_l, errs_w, errs_l).item() == 0.5


def test_lowering_the_winners_error_lowers_the_loss():
    err_w = T([0.2], requires_grad=True)
    err_l = T([0.2], requires_grad=True)
    diffusion_dpo_loss(err_w, err_l, T([0.2]), T([0.2]), beta=100.0).backward()
    assert err_w.grad.item() > 0 > err_l.grad.item()  # descent lowers err_w and raises err_l
    lower = diffusion_dpo_loss(T([0.19]), T([0.2]), T([0.2]), T([0.2]), beta=100.0)
    assert lower < math.log(2)


def test_timestep_balance_weights_by_hand():
    """Reference error scales 1 and 3 (mean 2): weights 2/1 and 2/3; equal scales give ones."""
    weights = timestep_balance_weights(T([1.0, 3.0]), T([1.0, 3.0]))
    assert weights.tolist() == pytest.approx([2.0, 2 / 3])
    assert timestep_balance_weights(T([0.5, 0.5]), T([0.5, 0.5])).tolist() == pytest.approx([1.0, 1.0])
    weighted = diffusion_dpo_loss(T([0.9]), T([1.0]), T([1.0]), T([1.0]), beta=4.0, weights=T([0.5]))
    assert weighted.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * 0.2))), abs=1e-6)


def test_inversion_dpo_loss_by_hand():
    """D_w 0.01, D_l 0.03, beta 100: -log sigmoid(-50 * (-0.02)) = log(1 + e^-1) = 0.313262."""
    assert inversion_dpo_loss(T([0.01]), T([0.03]), 100.0).item() == pytest.approx(0.313262, abs=1e-6)
    assert inversion_dpo_loss(T([0.02, 0.5]), T([0.02, 0.5]), 100.0).item() == pytest.approx(math.log(2))
    d_w, d_l = T([0.02], requires_grad=True), T([0.02], requires_grad=True)
    inversion_dpo_loss(d_w, d_l, 100.0).backward()
    assert d_w.grad.item() > 0 > d_l.grad.item()  # the winner's deviation is pushed down
    # the official code's sign (inside_term = 0.5 * diff * beta_dpo): -log sigmoid(+50 * (-0.02)) = log(1 + e)
    assert inversion_dpo_loss(T([0.01]), T([0.03]), 100.0, sign=1.0).item() == pytest.approx(1.313262, abs=1e-6)
    d_w, d_l = T([0.02], requires_grad=True), T([0.02], requires_grad=True)
    inversion_dpo_loss(d_w, d_l, 100.0, sign=1.0).backward()
    assert d_w.grad.item() < 0 < d_l.grad.item()  # official: the winner's deviation is pushed up


def test_inversion_deviation_by_hand():
    """Two steps, one sample of 2 elements: squared errors (1, 1) -> mean 1 and (4, 0) -> mean 2;
    weights (1, 3): (1 * 1 + 3 * 2) / 2 steps = 3.5."""
    policy = T([[[1.0, 1.0]], [[2.0, 0.0]]])  # (S=2, B=1, 2)
    assert inversion_deviation(policy, torch.zeros(2, 1, 2), T([1.0, 3.0])).tolist() == pytest.approx([3.5])


# ------------------------------------------------------------------ preference data


def test_rank_pairs_picks_best_and_worst_and_drops_ties():
    scores = T([1.0, 3.0, 2.0, 2.0, 0.0, 5.0, 4.0, 1.0])  # two prompts, four samples each
    best, worst, keep = rank_pairs(scores, 4, min_gap=0.0)
    assert best.tolist() == [1, 5] and worst.tolist() == [0, 4] and keep.tolist() == [True, True]
    _, _, keep = rank_pairs(T([1.0, 1.0, 2.0, 0.0]), 2, min_gap=0.0)
    assert keep.tolist() == [False, True]


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture()
def pick_a_pic(tmp_path):
    """Three Pick-a-Pic v2 rows: label_0 = 1 (jpg_0 wins), 0 (jpg_1 wins), 0.5 (tie, dropped).
    The winner is always the red image."""
    import datasets

    red, blue = _jpeg((250, 0, 0)), _jpeg((0, 0, 250))
    rows = {"jpg_0": [red, blue, red], "jpg_1": [blue, red, blue], "label_0": [1.0, 0.0, 0.5],
            "caption": ["a red thing", "another red thing", "a tie"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "train-0.parquet"))
    return tmp_path


class _PixelBackbone:
    """Latents = pixels: enough of the Backbone contract for the data path."""

    resolution, device = 8, torch.device("cpu")

    def encode(self, images):
        return images

    def encode_prompts(self, prompts, guidance=True):
        return Conditioning({"prompt_embeds": torch.zeros(len(prompts), 1)}, None, list(prompts))


def test_pick_a_pic_rows_drop_ties_and_put_the_winner_first(pick_a_pic):
    data = load_pick_a_pic(str(pick_a_pic))
    rows = preference_rows(data)
    assert rows == [0, 1]
    pairs = offline_pairs(_PixelBackbone(), data, rows, torch.Generator().manual_seed(0), random_crop=True)
    assert pairs.x0_w.shape == (2, 3, 8, 8) and pairs.prompts == ["a red thing", "another red thing"]
    assert (pairs.x0_w[:, 0] > 0.9).all() and (pairs.x0_w[:, 2] < 0.1).all()  # winners are red
    assert (pairs.x0_l[:, 2] > 0.9).all()  # losers are blue


def test_pick_a_pic_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no parquet files"):
        load_pick_a_pic(str(tmp_path))
    import datasets

    datasets.Dataset.from_dict({"caption": ["x"]}).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ConfigError, match="lacks Pick-a-Pic columns"):
        load_pick_a_pic(str(tmp_path / "bad.parquet"))


def test_bad_preference_rows_are_named_and_rejected_or_skipped(tmp_path, capsys):
    """Labels outside {0, 0.5, 1} and images that do not decode: an error naming the rows, or with
    bad_rows=skip a report and the good rows only."""
    import datasets

    red, blue = _jpeg((250, 0, 0)), _jpeg((0, 0, 250))
    rows = {"jpg_0": [red, b"not an image", red, red], "jpg_1": [blue, blue, blue, blue],
            "label_0": [1.0, 1.0, 2.0, 0.0], "caption": ["ok", "broken image", "bad label", "ok too"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "train-0.parquet"))
    data = load_pick_a_pic(str(tmp_path))
    with pytest.raises(ConfigError, match=r"1 label_0 value\(s\) outside \{0, 0.5, 1\} \(row 2: 2.0\)"):
        preference_rows(data)
    kept = preference_rows(data, "skip")
    assert kept == [0, 1, 3] and "skipping 1 preference row(s)" in capsys.readouterr().err
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"row 1 column 'jpg_0' of the preference dataset does not decode"):
        offline_pairs(_PixelBackbone(), data, kept, generator)
    pairs = offline_pairs(_PixelBackbone(), data, kept, generator, skip_bad_rows=True)
    assert pairs.prompts == ["ok", "ok too"] and float(pairs.metrics["rows_skipped"]) == 1.0
    assert "row 1 column 'jpg_0'" in capsys.readouterr().err


# ------------------------------------------------------------------ training steps on tiny backbones


class _BrightnessReward:
    """Prefers brighter images (deterministic, prompt-independent)."""

    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        scores = images.float().flatten(1).mean(1)
        return scores, {"brightness": scores}


def _experiment(config, sample_steps=4):
    return SimpleNamespace(method=config, method_name="diffusion_dpo",
                           sample=SampleConfig(num_steps=sample_steps, guidance_scale=1.0))


@pytest.mark.parametrize("family,prediction", [("sd", "epsilon"), ("sd", "v_prediction"), ("sd3", "flow"), ("qwenimage", "flow"),
                                                  ("zimage", "flow"), ("flux2-klein", "flow"), ("wan", "flow")])
def test_dpo_steps_lower_the_winners_error_relative_to_the_reference(tiny_models, family, prediction):
    """On a fixed batch of online pairs, a few optimizer steps make the policy's error margin
    (err_w - err_l) - (ref_err_w - ref_err_l) negative: the winner is denoised relatively better."""
    path = tiny_models(family, prediction)
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family=family, path=path, finetune="lora", lora_rank=4), "cpu")
    config = DiffusionDPOConfig(beta=2000.0, samples_per_prompt=2, pairs_from="reference")
    dpo = DiffusionDPO.build(_experiment(config), backbone, _BrightnessReward())
    with torch.no_grad():
        batch = dpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert len(batch.pairs) == 2
    start, _ = dpo.loss(batch)
    assert start.item() == pytest.approx(math.log(2), abs=1e-5)  # a fresh LoRA is the reference
    metrics = _train_on(dpo, batch, steps=8, lr=3e-3)[-1]
    with torch.no_grad():
        model_err, ref_err = dpo.errors(batch.pairs, batch.noise, batch.timesteps)
    margin = (model_err[:2] - model_err[2:]) - (ref_err[:2] - ref_err[2:])
    assert (margin < 0).all(), margin
    assert dpo.loss(batch)[0].item() < math.log(2) - 0.05
    assert set(metrics) >= {"implicit_accuracy", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l", "reward_w"}


def test_winner_and_loser_share_noise_and_timestep(tiny_models):
    """Diffusion-DPO noises both images of a pair with the same noise at the same timestep (the
    reference's errors cancel only then): what reaches add_noise is [x_w; x_l] with [n; n] at [t; t],
    and different pairs get different draws."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora"), "cpu")
    dpo = DiffusionDPO.build(_experiment(DiffusionDPOConfig(samples_per_prompt=2)), backbone, _BrightnessReward())
    batch = dpo.collect(["a red circle", "a blue square", "a green triangle"], torch.Generator().manual_seed(0))
    seen = []
    add_noise = backbone.schedule.add_noise

    def recording(x0, noise, t):
        seen.append((x0, noise, t))
        return add_noise(x0, noise, t)

    backbone.schedule.add_noise = recording
    dpo.loss(batch)
    x0, noise, t = seen[0]
    n = len(batch.pairs)
    assert n == 3 and x0.shape[0] == noise.shape[0] == t.shape[0] == 2 * n
    torch.testing.assert_close(x0[:n], batch.pairs.x0_w)
    torch.testing.assert_close(x0[n:], batch.pairs.x0_l)
    assert torch.equal(noise[:n], noise[n:]) and torch.equal(t[:n], t[n:])
    assert not torch.equal(noise[0], noise[1]) and len(set(t[:n].tolist())) > 1


def test_stable_reference_follows_the_policy_and_is_anchored(tiny_models):
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora"), "cpu")
    config = DiffusionDPOConfig(reference_update_rate=0.25, reference_anchor=0.5)
    dpo = DiffusionDPO.build(_experiment(config), backbone, _BrightnessReward())
    name, param = next((n, p) for n, p in dpo.params.items() if "lora_B" in n)
    start = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    dpo.after_optimizer_step()
    # ref = start + 0.25 * (policy - start) = start + 0.25, then halfway back to start: start + 0.125
    torch.testing.assert_close(dpo.stable_reference.shadow[name], start + 0.125)
    with dpo.reference():
        torch.testing.assert_close(param.detach(), start + 0.125)
    torch.testing.assert_close(param.detach(), start + 1.0)  # swapped back
    state = dpo.state_dict()
    dpo.stable_reference.shadow[name].zero_()
    dpo.load_state_dict(state)
    torch.testing.assert_close(dpo.stable_reference.shadow[name], start + 0.125)
    batch = dpo.collect(["a"], torch.Generator().manual_seed(0))
    loss, _ = dpo.loss(batch)
    loss.backward()  # the reference's swap must not break the policy's backward
    assert param.grad is not None


def test_config_errors_are_clear(tiny_models):
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora"), "cpu")
    with pytest.raises(ConfigError, match="online pairs are ranked by a reward"):
        DiffusionDPO.build(_experiment(DiffusionDPOConfig()), backbone, None)
    with pytest.raises(ConfigError, match="offline needs method.dataset"):
        DiffusionDPOConfig(pairs="offline")
    with pytest.raises(ConfigError, match="reference is frozen and it does nothing"):
        DiffusionDPOConfig(reference_anchor=0.5)
    frozen = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="none"), "cpu")
    with pytest.raises(ConfigError, match="set backbone.finetune"):
        DiffusionDPO.build(_experiment(DiffusionDPOConfig()), frozen, _BrightnessReward())


def _reconstruction_error(backbone, inversion, cond, guidance, num_steps):
    with torch.no_grad():
        final = sample(backbone, cond, num_steps, guidance, latents=inversion.states[0]).final
    return per_sample_mse(final, inversion.states[-1])


def test_inversion_dpo_makes_the_policy_reconstruct_the_winner_better_than_the_loser(tiny_models):
    """The sign decided from the derivation: after training on one pair, the policy (sampling from
    the inverted noise) reconstructs the winner better relative to the loser than before; with the
    official code's opposite sign it would do the reverse."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora", lora_rank=4), "cpu")
    config = InversionDPOConfig(beta=50.0, inversion_steps=4, inversion_guidance=2.0, samples_per_prompt=2)
    dpo = InversionDPO.build(_experiment(config), backbone, _BrightnessReward())
    prompts = ["a red circle"]
    with torch.no_grad():
        batch = dpo.collect(prompts, torch.Generator().manual_seed(0))
    cond = backbone.encode_prompts(prompts, guidance=False)

    def relative():
        w = _reconstruction_error(backbone, batch.inversion_w, cond, 1.0, 4)
        lo = _reconstruction_error(backbone, batch.inversion_l, cond, 1.0, 4)
        return (w / lo).item()

    before = relative()
    first, _ = dpo.loss(batch)
    assert first.item() == pytest.approx(math.log(2), abs=0.05)
    metrics = _train_on(dpo, batch, steps=10, lr=3e-3)[-1]
    after = relative()
    assert metrics["deviation_w"] < metrics["deviation_l"]
    assert after < before * 0.9, (before, after)


def test_caption_dropout_and_vae_posterior_latents(tiny_models, pick_a_pic):
    """proportion_empty_prompts (the official train.py's caption dropout): at 1 every pair trains on
    the empty prompt's conditioning, at 0.5 some do, and the sampled pairs keep their captions;
    vae_latents: sample draws the offline latents from the VAE posterior (the official
    latent_dist.sample(): the same generator seed gives the same draw, another seed another, both
    off the mean), mean gives the posterior mean."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora"), "cpu")
    empty = backbone.encode_prompts([""], guidance=False).positive["prompt_embeds"][0]
    config = DiffusionDPOConfig(pairs="offline", dataset=str(pick_a_pic), proportion_empty_prompts=1.0)
    dpo = DiffusionDPO.build(_experiment(config), backbone, None)
    batch = dpo.collect([0, 1], torch.Generator().manual_seed(0))
    embeds = batch.pairs.cond.positive["prompt_embeds"]
    assert all(torch.equal(e, empty) for e in embeds) and batch.pairs.prompts == ["a red thing", "another red thing"]
    dpo.config.proportion_empty_prompts = 0.5
    kept = [not torch.equal(e, empty) for seed in range(8)
            for e in dpo.collect([0, 1], torch.Generator().manual_seed(seed)).pairs.cond.positive["prompt_embeds"]]
    assert 0 < sum(kept) < len(kept)
    assert all("captions_dropped" in dpo.collect([0], torch.Generator().manual_seed(seed)).pairs.metrics
               for seed in range(4))  # reported on every micro-step, dropped or not (processes average it)
    dpo.config.proportion_empty_prompts = 0.0
    assert not any(torch.equal(e, empty) for e in dpo.collect([0], torch.Generator().manual_seed(0)).pairs.cond.positive["prompt_embeds"])

    def latents(mode, seed):
        dpo.config.vae_latents = mode
        return dpo.pairs([0], torch.Generator().manual_seed(seed)).x0_w

    mean = latents("mean", 0)
    torch.testing.assert_close(latents("mean", 1), mean)
    torch.testing.assert_close(latents("sample", 3), latents("sample", 3))
    assert not torch.allclose(latents("sample", 3), latents("sample", 4))
    assert not torch.allclose(latents("sample", 3), mean)
    with pytest.raises(ConfigError, match="proportion_empty_prompts"):
        DiffusionDPOConfig(proportion_empty_prompts=1.5)
    with pytest.raises(ConfigError, match="drops no captions"):
        InversionDPOConfig(proportion_empty_prompts=0.2)


def test_the_official_inversion_dpo_objective_cannot_leave_a_fresh_lora(tiny_models):
    """objective: official (MIGHTYEZ/Inversion-DPO train_ddim.py: +beta/2 inside the sigmoid, the policy
    at the reference's guidance): from a zero-initialised LoRA the policy's predictions equal the
    reference's, D_w = D_l = 0, the loss is log 2 and every gradient is 0, up to the rounding of the
    policy's batch (winners and losers together) against the reference's (each alone): measured
    |D| ~1e-13, largest gradient 5e-8 against the derived objective's 5e-3 (policy at guidance 1) on
    the same batch. (Exactly 0 under transformers 5.24 / accelerate 1.15; 5.25 / 1.16 round differently.)"""
    grads = {}
    for objective in ("official", "derived"):
        torch.manual_seed(0)
        backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora", lora_rank=4), "cpu")
        config = InversionDPOConfig(beta=50.0, inversion_steps=3, samples_per_prompt=2, objective=objective)
        dpo = InversionDPO.build(_experiment(config), backbone, _BrightnessReward())
        assert dpo.policy_guidance == (2.0 if objective == "official" else 1.0)
        with torch.no_grad():
            batch = dpo.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
        loss, metrics = dpo.loss(batch)
        loss.backward()
        params = dpo.named_trainable_parameters().values()
        grads[objective] = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
        if objective == "official":  # equal up to the rounding of batches of other sizes (~1e-13)
            assert abs(float(metrics["deviation_w"])) < 1e-10 and abs(float(metrics["deviation_l"])) < 1e-10
            assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert grads["official"] < 1e-4 * grads["derived"] and grads["derived"] > 1e-6
    with pytest.raises(ConfigError, match="policy_guidance does nothing"):
        InversionDPOConfig(objective="official", policy_guidance=3.0)
    with pytest.raises(ConfigError, match="timestep_weighting does nothing"):
        InversionDPOConfig(timestep_weighting="relative")


def test_inversions_of_offline_pairs_are_cached(tiny_models, pick_a_pic, monkeypatch):
    import genalign.finetuners.inversion_dpo as module

    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora"), "cpu")
    config = InversionDPOConfig(pairs="offline", dataset=str(pick_a_pic), inversion_steps=2)
    dpo = InversionDPO.build(_experiment(config), backbone, None)
    assert dpo.training_data() == [0, 1] and dpo.prompts_of([1]) == ["another red thing"]
    calls = []
    real = module.invert_trajectory
    monkeypatch.setattr(module, "invert_trajectory", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = dpo.collect([1], torch.Generator().manual_seed(0))
    second = dpo.collect([1], torch.Generator().manual_seed(1))
    assert len(calls) == 2  # winner and loser, once
    torch.testing.assert_close(first.inversion_w.predictions, second.inversion_w.predictions)
    loss, _ = dpo.loss(second)
    assert torch.isfinite(loss)


def test_full_fine_tuning_uses_a_frozen_copy_as_reference(tiny_models):
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="full"), "cpu")
    dpo = DiffusionDPO.build(_experiment(DiffusionDPOConfig(beta=2000.0)), backbone, _BrightnessReward())
    with torch.no_grad():
        batch = dpo.collect(["a red circle"], torch.Generator().manual_seed(0))
    metrics = _train_on(dpo, batch, steps=3, lr=1e-4)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    with torch.no_grad():
        model_err, ref_err = dpo.errors(batch.pairs, batch.noise, batch.timesteps)
    assert not torch.allclose(model_err, ref_err)  # the policy moved, the frozen copy did not
    assert metrics[-1]["ref_mse_w"] == pytest.approx(metrics[0]["ref_mse_w"], rel=1e-5)


def _train_on(finetuner, batch, steps, lr):
    optimizer = torch.optim.Adam(list(finetuner.named_trainable_parameters().values()), lr=lr)
    metrics = []
    for _ in range(steps):
        loss, m = finetuner.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics.append({k: float(v) for k, v in {"loss": loss.detach(), **m}.items()})
    return metrics


def test_online_pairs_are_reused_and_survive_a_resume(tiny_models):
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora"), "cpu")
    config = DiffusionDPOConfig(pairs_reuse=2, samples_per_prompt=2)
    dpo = DiffusionDPO.build(_experiment(config), backbone, _BrightnessReward())
    first = dpo.collect(["a red circle"], torch.Generator().manual_seed(0))
    state = dpo.state_dict()  # a checkpoint after the first use of these pairs
    own = dpo.process_state_dict()
    assert "buffer" not in state and "buffer" in own  # the pairs are this process's own
    second = dpo.collect(["a blue square"], torch.Generator().manual_seed(1))
    assert second.pairs is first.pairs and not torch.equal(second.noise, first.noise)
    third = dpo.collect(["a blue square"], torch.Generator().manual_seed(2))
    assert third.pairs is not first.pairs and third.pairs.prompts == ["a blue square"]
    resumed = DiffusionDPO.build(_experiment(config), backbone, _BrightnessReward())
    resumed.load_state_dict(state)
    resumed.load_process_state_dict(own)
    again = resumed.collect(["a blue square"], torch.Generator().manual_seed(1))
    assert again.pairs.prompts == ["a red circle"]  # the buffered pairs' second use
    torch.testing.assert_close(again.pairs.x0_w, first.pairs.x0_w)


def test_inversion_dpo_step_weights_come_from_the_schedule(tiny_models):
    """auto: 1 / (2 alphabar_t) on a diffusion schedule (alphabar read from diffusers' own
    scheduler), uniform on a flow schedule, which has none; alpha on a flow model is refused."""
    from diffusers import DDIMScheduler

    sd_path = tiny_models("sd")
    sd = load_backbone(BackboneConfig(family="sd", path=sd_path, finetune="lora"), "cpu")
    dpo = InversionDPO(InversionDPOConfig(), sd, _BrightnessReward(), SampleConfig(num_steps=4))
    alphas = DDIMScheduler.from_pretrained(sd_path, subfolder="scheduler").alphas_cumprod
    t = torch.tensor([999, 500, 1])
    torch.testing.assert_close(dpo.step_weights(t), (1 / (2 * alphas[t])).float())
    flow = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="lora"), "cpu")
    uniform = InversionDPO(InversionDPOConfig(), flow, _BrightnessReward(), SampleConfig(num_steps=4))
    assert torch.equal(uniform.step_weights(torch.tensor([900.0, 10.0])), torch.ones(2))
    with pytest.raises(ValueError, match="step_weighting alpha needs a diffusion"):
        InversionDPO(InversionDPOConfig(step_weighting="alpha"), flow, _BrightnessReward(), SampleConfig(num_steps=4))
