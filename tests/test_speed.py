"""The speed levers: the thread count from the cores a process has, and ``backbone.compile``
(torch.compile of the denoiser) giving what the eager denoiser gives, with LoRA, its reference
(adapters off), gradients and an optimizer step in between."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from genalign.core import speed


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_are_the_cores_of_this_process_shared_among_the_launchs_processes(monkeypatch, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(speed, "available_cores", lambda: 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert speed.set_threads() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes on 6 cores: 1 thread each, not 6
    assert speed.default_threads() == 1 and speed.set_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert speed.set_threads() == 3
    assert speed.set_threads(2) == 2  # a requested count wins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun sets it: left to torch
    torch.set_num_threads(5)
    assert speed.set_threads() == 5
    with pytest.raises(ValueError, match=">= 0"):
        speed.set_threads(-1)


def test_available_cores_are_bounded_by_the_affinity_and_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(speed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(speed, "_cgroup_cores", lambda: None)
    assert speed.available_cores() == 4
    monkeypatch.setattr(speed, "_cgroup_cores", lambda: 2.5)  # cpu.max "250000 100000"
    assert speed.available_cores() == 2
    monkeypatch.setattr(speed, "_cgroup_cores", lambda: 0.5)
    assert speed.available_cores() == 1


def test_run_threads_is_checked():
    from genalign.core.config import ConfigError
    from genalign.core.experiment import BackboneConfig, RunConfig

    with pytest.raises(ConfigError, match="threads"):
        RunConfig(threads=-2)
    with pytest.raises(ConfigError, match="compile_warmup"):
        BackboneConfig(compile_warmup=-1)


def test_compile_falls_back_to_eager_with_a_warning_where_inductor_cannot_compile(tiny_models, monkeypatch):
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone

    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in speed.compile_unavailable("cpu")
    with pytest.warns(UserWarning, match="runs eagerly"):
        backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora", compile="all"))
    assert backbone.denoiser is backbone.unwrapped_denoiser


def test_compiled_denoiser_equals_the_eager_one_with_lora_its_reference_and_a_training_step(tiny_models):
    """One backbone compiled, a twin eager, the same LoRA initialisation: predictions (guided, no
    gradient), the reference's (adapters disabled), the loss's gradients, and the predictions after
    an AdamW step agree; the compiled module is a wrapper around the very same module."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone

    def build(compile: bool):
        torch.manual_seed(0)
        return load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora", lora_rank=4,
                                            lora_alpha=4, compile="all" if compile else "none", compile_warmup=0))

    eager, compiled = build(False), build(True)
    assert compiled.denoiser is not compiled.unwrapped_denoiser
    assert compiled.denoiser.module is compiled.unwrapped_denoiser
    prompts = ["a red circle", "two blue squares"]
    cond = eager.encode_prompts(prompts)
    x = torch.randn(2, *eager.latent_shape(), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 300])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            for backbone in (eager, compiled):  # the LoRA's B starts at 0: make it matter
                for name, p in backbone.unwrapped_denoiser.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        results = []
        for backbone in (eager, compiled):
            params = [p for p in backbone.unwrapped_denoiser.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-2)
            with torch.no_grad():
                guided = backbone.predict(x, t, cond, 2.0)
                with backbone.reference():
                    reference = backbone.predict(x, t, cond, 2.0)
            with backbone.training():
                backbone.predict(x, t, cond, 1.0).square().mean().backward()
            grads = torch.cat([p.grad.flatten() for p in params])
            optimizer.step()
            with torch.no_grad():
                after = backbone.predict(x, t, cond, 2.0)
            results.append((guided, reference, grads, after))
    for name, a, b in zip(("guided", "reference", "gradients", "after a step"), *results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    assert not torch.allclose(results[0][0], results[0][1], atol=1e-3)  # LoRA on and off differ
    assert not torch.allclose(results[0][0], results[0][3], atol=1e-4)  # the step moved the prediction


def test_a_compiled_training_pass_with_gradient_checkpointing_gives_the_eager_gradients(tiny_models):
    """``backbone.compile=all`` with ``gradient_checkpointing``: the checkpointed blocks are traced
    by dynamo (torch's checkpoint higher-order op); loss and LoRA gradients equal the eager twin's."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone

    def build(compile: bool):
        torch.manual_seed(0)
        return load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora", lora_rank=4,
                                            lora_alpha=4, gradient_checkpointing=True, compile_warmup=0,
                                            compile="all" if compile else "none"))

    eager, compiled = build(False), build(True)
    assert compiled.denoiser.warmup == 0  # backbone.compile_warmup: compiled from the first call
    cond = eager.encode_prompts(["a red circle", "two blue squares"])
    x = torch.randn(2, *eager.latent_shape(), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 300])
    grads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backbone in (eager, compiled):
            with torch.no_grad():
                for name, p in backbone.unwrapped_denoiser.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
            params = [p for p in backbone.unwrapped_denoiser.parameters() if p.requires_grad]
            with backbone.training():
                assert backbone.unwrapped_denoiser.is_gradient_checkpointing
                loss = backbone.predict(x, t, cond, 1.0).square().mean()
                loss.backward()
            grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in params])))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
    assert grads[0][1].abs().sum() > 0


def test_a_compiled_denoiser_lifts_dynamos_graph_limit_so_its_kinds_of_call_stay_compiled():
    """dynamo keeps 8 graphs of a code object and runs it eagerly after (silently but for one
    warning); a denoiser's forward meets more kinds than that in one run."""
    import torch._dynamo.config as dynamo

    from genalign.core.speed import RECOMPILES, CompiledDenoiser

    with dynamo.patch(recompile_limit=8):
        CompiledDenoiser(torch.nn.Linear(2, 2), "sampling")
        assert dynamo.recompile_limit == RECOMPILES >= 32


def test_a_kind_of_call_runs_eagerly_until_it_has_been_seen_warmup_times_and_sampling_mode_leaves_training_eager():
    from genalign.core.speed import CompiledDenoiser

    calls: list[str] = []
    module = torch.nn.Linear(3, 3)
    wrapper = CompiledDenoiser(module, "sampling")
    wrapper.warmup = 2
    wrapper.compiled = lambda x: calls.append("compiled") or module(x)
    x, y = torch.ones(2, 3), torch.ones(5, 3)
    with torch.no_grad():
        for _ in range(3):
            wrapper(x)
        wrapper(y)
    assert calls == ["compiled"]  # the third call of shape (2, 3); (5, 3) is new
    wrapper.in_reference = True
    with torch.no_grad():
        for _ in range(3):
            wrapper(x)
    wrapper.in_reference = False
    for _ in range(3):
        wrapper(x).sum().backward()  # with gradient: eager under "sampling"
    assert calls == ["compiled"]
    wrapper.mode = "all"
    for _ in range(3):
        wrapper(x).sum().backward()
    assert calls == ["compiled", "compiled"]
    assert wrapper.weight is module.weight and wrapper.in_features == 3


def _adamw_by_hand(p0, grads, lr, betas, eps, wd):
    """AdamW (Loshchilov and Hutter 2019, Algorithm 2 with torch's bias corrections), step by step."""
    p, m, v = p0.clone().double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_the_run_optimizer_is_fused_adamw_where_the_device_has_it_and_updates_as_adamw_does():
    from types import SimpleNamespace

    from genalign.core.experiment import RunConfig
    from genalign.core.optimization import fusable, make_optimization

    accelerator = SimpleNamespace(prepare=lambda optimizer: optimizer)
    torch.manual_seed(0)
    p0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(3)]
    run = RunConfig(lr=0.01, weight_decay=0.1, adam_betas=(0.8, 0.9), adam_eps=1e-3, steps=3)
    for fused in (True, False):
        param = torch.nn.Parameter(p0.clone())
        optimizer, _, _ = make_optimization(RunConfig(**{**run.__dict__, "fused_adamw": fused}), [param], accelerator)
        assert bool(optimizer.defaults["fused"]) is fused
        for g in grads:
            param.grad = g.clone()
            optimizer.step()
        expected = _adamw_by_hand(p0, grads, 0.01, (0.8, 0.9), 1e-3, 0.1)
        assert torch.allclose(param.detach().double(), expected, atol=1e-6), fused
    assert fusable([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))])
    assert not fusable([torch.nn.Parameter(torch.ones(2)), torch.ones(2, device="meta")])  # two kinds of device


def test_tf32_is_set_for_cuda_matmuls_and_convolutions_and_can_be_turned_off():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        speed.set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        speed.set_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_gpu_scripts_sections_fit_in_its_eight_minutes():
    """bench/gpu.sh must end within 8 minutes on one GPU (the time a lent GPU gives): its sections'
    own time limits, which stop a section that runs long, add up to less."""
    import re
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu.sh").read_text()
    limits = [int(n) for n in re.findall(r"^\s*section (\d+) ", script, flags=re.M)]
    assert len(limits) >= 6 and sum(limits) <= 470, limits


@contextlib.contextmanager
def fp32_products():
    """Full fp32 products on this process's CPU within, its precision settings as they were after
    (``set_float32_matmul_precision`` cannot restore them: reading "high" back and setting it
    sends oneDNN's fp32 products through TF32, which turns the merge off)."""
    mkldnn = torch.backends.mkldnn
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, mkldnn.matmul.fp32_precision,
             mkldnn.conv.fp32_precision)
    mkldnn.matmul.fp32_precision = mkldnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        mkldnn.matmul.fp32_precision, mkldnn.conv.fp32_precision = saved[2:]


@pytest.fixture
def full_fp32():
    with fp32_products():
        yield


def _lora_backbone(tiny_models, family="sd", **settings):
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family=family, path=tiny_models(family), finetune="lora", lora_rank=4,
                                            lora_alpha=8, **settings))
    with torch.no_grad():  # the LoRA's B starts at 0: make it matter
        for name, p in backbone.unwrapped_denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return backbone


def test_merged_lora_computes_w_plus_scaled_ba_and_puts_every_weight_back_bitwise(tiny_models, full_fp32):
    """``backbone.merged()``: a wrapped linear layer computes x (W + (alpha / r) B A)^T + b (by hand
    here) without calling its LoRA factors; afterwards every weight is the tensor it was (same
    storage, same values) and the adapters' requires_grad is as before. It merges nothing with
    gradients on, inside ``reference()``, under bf16 autocast or reduced-precision fp32 products, or
    with ``merge_lora`` off."""
    from peft.tuners.lora import LoraLayer

    backbone = _lora_backbone(tiny_models)
    denoiser = backbone.unwrapped_denoiser
    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
    layer = next(m for m in layers if isinstance(m.get_base_layer(), torch.nn.Linear))
    base = layer.get_base_layer()
    weights = {id(m): (m.get_base_layer().weight.data, m.get_base_layer().weight.detach().clone()) for m in layers}
    flags = [p.requires_grad for p in denoiser.parameters()]
    W, A, B = base.weight.detach().clone(), layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(2))
    by_hand = x @ (W + (8 / 4) * B @ A).T + (0 if base.bias is None else base.bias.detach())
    calls = []
    layer.lora_A["default"].register_forward_hook(lambda *a: calls.append(1))

    def merged_in_effect() -> bool:
        with backbone.merged():
            return base.weight.data.data_ptr() != weights[id(layer)][0].data_ptr()

    with torch.no_grad():
        unmerged = layer(x)
        assert len(calls) == 1
        with backbone.merged():
            merged = layer(x)
        assert len(calls) == 1  # the factors were not used: the merged weight was
    torch.testing.assert_close(merged, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unmerged, by_hand, rtol=1e-5, atol=1e-6)
    for m in layers:
        data, values = weights[id(m)]
        assert m.get_base_layer().weight.data.data_ptr() == data.data_ptr()
        assert torch.equal(m.get_base_layer().weight, values)
    assert [p.requires_grad for p in denoiser.parameters()] == flags and any(flags)
    with torch.no_grad():
        assert merged_in_effect()
        with backbone.reference():
            assert not merged_in_effect()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not merged_in_effect()
        with fp32_products():
            speed.set_tf32(True)  # run.tf32 is CUDA's: a CPU's products stay fp32 and merge
            assert merged_in_effect()
            torch.set_float32_matmul_precision("medium")  # oneDNN's fp32 products through bf16
            assert not merged_in_effect()
        backbone.config.merge_lora = False
        assert not merged_in_effect()
        backbone.config.merge_lora = True
    assert not merged_in_effect()  # gradients on


@pytest.mark.parametrize("family,eta", [("sd", 1.0), ("sd3", 0.7)])
def test_a_merged_rollout_is_the_unmerged_one_to_rounding_far_inside_ppos_clip_range(tiny_models, family, eta,
                                                                                     full_fp32):
    """A rollout with the LoRA merged (the default) against the same rollout unmerged, and its
    log-probs against the training pass's recomputation (gradients on, unmerged): within 1e-5,
    a tenth of the PPO clip range of DDPO and Flow-GRPO (1e-4), so the first update's ratio is
    not clipped and the old log-probs need no recomputation."""
    from genalign.core.rollout import rollout
    from genalign.core.sampler import log_probs_of

    backbone = _lora_backbone(tiny_models, family)
    runs = {}
    for merge in (True, False):
        backbone.config.merge_lora = merge
        runs[merge] = rollout(backbone, ["a red circle", "two blue squares"], 4, 2.0, eta, samples_per_prompt=2,
                              generator=torch.Generator().manual_seed(3))
    merged, unmerged = runs[True].trajectory, runs[False].trajectory
    assert (merged.log_probs - unmerged.log_probs).abs().max() < 1e-5
    torch.testing.assert_close(merged.latents, unmerged.latents, rtol=1e-3, atol=1e-4)
    with torch.enable_grad():
        recomputed = log_probs_of(backbone, merged, list(range(4))).detach()
    assert (recomputed - merged.log_probs).abs().max() < 1e-5
    with torch.no_grad(), backbone.reference():  # the LoRA moved the samples: the comparison can fail
        base = rollout(backbone, ["a red circle", "two blue squares"], 4, 2.0, eta, samples_per_prompt=2,
                       generator=torch.Generator().manual_seed(3))
    assert (base.trajectory.latents[-1] - unmerged.latents[-1]).abs().max() > 1e-3


def test_a_merge_failing_half_way_puts_back_the_weights_it_had_merged(tiny_models, full_fp32):
    from peft.tuners.lora import LoraLayer

    backbone = _lora_backbone(tiny_models)
    layers = [m for m in backbone.unwrapped_denoiser.modules() if isinstance(m, LoraLayer)]
    before = [m.get_base_layer().weight.detach().clone() for m in layers]

    def fails(adapter):
        raise RuntimeError("no delta")

    layers[len(layers) // 2].get_delta_weight = fails  # the layers before it are merged by then
    with torch.no_grad(), pytest.raises(RuntimeError, match="no delta"):
        with backbone.merged():
            pass
    for m, weight in zip(layers, before):
        assert torch.equal(m.get_base_layer().weight, weight)
    assert all(not m.disable_adapters for m in layers)
