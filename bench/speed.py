"""The speed levers of issue #32, each measured against its absence side by side in one run (this
machine is noisy: compare the printed ratios, never absolute times across runs).

``rollout``: a rollout with per-step log-probs (prompt encoding, sampling with guidance, no decode)
on the shapes SD model (or ``--family sd3``) in four settings: eager fp32 (today's default),
``backbone.compile`` fp32, eager under bf16 autocast (``run.mixed_precision=bf16``; CPUs with
AMX / AVX-512 bf16 and GPUs) and compiled bf16; beside them the plain diffusers pipeline (fp32,
eager, latents out) on the same prompts, steps, guidance and noise. Alternating rounds, medians.

``step``: each method's training step (the trainer's loss + backward on one collected micro-batch,
bench/step_overhead.py's set-ups) with the denoiser compiled over the same step eager, in fp32 (and
with ``--bf16`` also both under bf16 autocast).

``images`` (for a GPU: ``bench/gpu.sh``): images per second of whole training iterations
(rollouts, loss and backward, AdamW) on random-weight models of real sizes, eager and compiled:
Flow-GRPO on an SD3.5-Medium-sized transformer (512 px, 10 steps, a group of 24, CFG 4.5) and
Diffusion-DPO on an SDXL-sized UNet (pairs of policy samples), bf16 autocast.

``levers``: fused AdamW over torch's default, channels-last UNets, TF32 (CUDA), each against its
absence. ``step --profile`` adds the time inside the kernels compile calls and cannot change
(convolutions, matrix products, attention): the bound they put on its speed-up. ``syncs``: the host
syncs in each method's step and rollout, by the line that asks.

``job``: the README main job (``configs/shapes/diffusion_dpo.yaml``) trained as shipped, with
``run.mixed_precision=bf16``, and with ``backbone.compile=sampling`` as well, each from a cold
compile cache (``--warm``: a setting again with the cache its cold run left, as a second run on the
same machine finds it), then each scored by ``genalign eval shapes`` against the base (the same
held-out prompts and seeds): wall-time ratios and the gold figures.

    .venv/bin/python bench/speed.py rollout
    .venv/bin/python bench/speed.py rollout --family sd3 --backbone models/shapes/sd3 --eta 0.7
    .venv/bin/python bench/speed.py step --methods diffusion_dpo ddpo flow_grpo
    .venv/bin/python bench/speed.py step --profile
    .venv/bin/python bench/speed.py levers
    .venv/bin/python bench/speed.py syncs --methods diffusion_dpo flow_grpo
    .venv/bin/python bench/speed.py job --out-dir runs/speed-job --settings shipped compile+bf16 --warm compile+bf16
    .venv/bin/python bench/speed.py images --device cuda          # bench/gpu.sh

Compile times are printed apart (the first call of each compiled setting, with the process's
inductor cache; the job starts each run from an empty one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _medians(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in alternating rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: statistics.median(v) for name, v in times.items()}


def _prompts(batch: int) -> list[str]:
    """``batch`` shapes prompts, eight colour-shape pairs over and over."""
    prompts = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square")]
    return (prompts * (batch // len(prompts) + 1))[:batch]


def rollout(args: argparse.Namespace) -> dict[str, Any]:
    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import load_backbone

    device = torch.device(args.device)
    backbone = load_backbone(BackboneConfig(family=args.family, path=args.backbone, finetune="none"), device)
    pipe = backbone.pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = _prompts(args.batch)
    noise = initial_noise(backbone, args.batch, torch.Generator().manual_seed(0))
    eager = backbone.unwrapped_denoiser
    backbone.compile_denoiser(warmup=0)  # compiled from the first call: the warm-up round compiles
    compiled = backbone.denoiser
    flow = args.family in ("sd3", "flux")

    def ours(module: torch.nn.Module, bf16: bool) -> Callable[[], float]:
        @torch.no_grad()
        def run() -> float:
            backbone.denoiser = module
            _sync(device)
            start = time.perf_counter()
            with _autocast(device, bf16):
                cond = backbone.encode_prompts(prompts, guidance=args.guidance_scale != 1.0)
                trajectory = sample(backbone, cond, args.steps, args.guidance_scale, args.eta, latents=noise,
                                    generator=torch.Generator().manual_seed(1))
            assert trajectory.log_probs is not None
            _sync(device)
            return time.perf_counter() - start
        return run

    @torch.no_grad()
    def pipeline() -> float:
        kwargs = {} if flow else {"eta": args.eta}  # diffusers' flow pipelines sample the ODE only
        if flow and backbone.max_sequence_length:  # the T5 length genalign encodes with
            kwargs["max_sequence_length"] = backbone.max_sequence_length
        _sync(device)
        start = time.perf_counter()
        pipe(prompts, latents=noise.clone(), num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
             output_type="latent", generator=torch.Generator().manual_seed(1), **kwargs)
        _sync(device)
        return time.perf_counter() - start

    fns = {"eager fp32": ours(eager, False), "compiled fp32": ours(compiled, False),
           "eager bf16": ours(eager, True), "compiled bf16": ours(compiled, True), "diffusers pipeline": pipeline}
    first = {name: fn() for name, fn in fns.items()}  # warm-up; compiled: the compile
    median = _medians(fns, args.repeats)
    base, plain = median["eager fp32"], median["diffusers pipeline"]
    print(f"rollout: {args.family} {args.backbone}, {args.batch} images, {args.steps} steps, guidance "
          f"{args.guidance_scale}, eta {args.eta}, {device}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| setting | seconds | speed-up over eager fp32 | over the diffusers pipeline | first call (s) |")
    print("|---|---|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.3f} | {base / seconds:.2f} | {plain / seconds:.2f} | {first[name]:.1f} |")
    return {"family": args.family, "backbone": args.backbone, "batch": args.batch, "steps": args.steps,
            "seconds": median, "first_call": first, "speedup_over_eager": {k: base / v for k, v in median.items()},
            "speedup_over_pipeline": {k: plain / v for k, v in median.items()}}


def _merge_rollouts(family: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import load_backbone

    eta = 1.0 if family == "sd" else 0.7
    backbone = load_backbone(BackboneConfig(family=family, path=f"models/shapes/{family}", finetune="lora",
                                            lora_rank=8, lora_alpha=8), device)
    with torch.no_grad():
        for name, p in backbone.named_trainable_parameters().items():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    prompts = _prompts(args.batch)
    cond = backbone.encode_prompts(prompts, guidance=True)
    noise = initial_noise(backbone, args.batch, torch.Generator().manual_seed(0))
    eager = backbone.unwrapped_denoiser
    backbone.compile_denoiser(warmup=0)
    compiled = backbone.denoiser
    log_probs: dict[str, torch.Tensor] = {}

    def run(module: torch.nn.Module, merged: bool, name: str) -> Callable[[], float]:
        @torch.no_grad()
        def timed() -> float:
            backbone.denoiser, backbone.config.merge_lora = module, merged
            _sync(device)
            start = time.perf_counter()
            trajectory = sample(backbone, cond, args.steps, 2.0, eta, latents=noise,
                                generator=torch.Generator().manual_seed(1))
            _sync(device)
            log_probs[name] = trajectory.log_probs
            return time.perf_counter() - start
        return timed

    fns = {f"{kind} {'merged' if merged else 'unmerged'}": run(module, merged, f"{kind} {merged}")
           for kind, module in (("eager", eager), ("compiled", compiled)) for merged in (False, True)}
    first = {name: fn() for name, fn in fns.items()}
    median = _medians(fns, args.repeats)
    differences = {f"{kind} merged": (log_probs[f"{kind} True"] - log_probs["eager False"]).abs().max().item()
                   for kind in ("eager", "compiled")}
    print(f"merge: {family}, LoRA r8 on {len(backbone.unwrapped_denoiser.peft_config['default'].target_modules)} "
          f"kinds of layer, {args.batch} images, {args.steps} steps, guidance 2, eta {eta}, {device}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print("| setting | seconds | merged over unmerged | largest log-prob difference from eager unmerged | first call (s) |")
    print("|---|---|---|---|---|")
    for name, seconds in median.items():
        kind, how = name.split()
        ratio = median[f"{kind} unmerged"] / seconds
        difference = f"{differences[name]:.1e}" if how == "merged" else "-"
        print(f"| {name} | {seconds:.3f} | {ratio:.2f} | {difference} | {first[name]:.1f} |")
    extern = statistics.median(_extern_seconds(fns["compiled merged"]) for _ in range(3))
    print(f"compiled merged: {extern:.3f} s inside the extern kernels (convolutions, matrix products, attention: "
          f"{extern / median['compiled merged']:.0%}); no compile passes eager unmerged / extern = "
          f"{median['eager unmerged'] / extern:.2f}x")
    return {"seconds": median, "first_call": first, "log_prob_difference": differences, "extern_seconds": extern}


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Rollouts (per-step log-probs, guidance, no decode) with a trained-looking LoRA (the shipped
    configs' rank 8, every factor random), unmerged against merged (``backbone.merge_lora``), eager
    and compiled, fp32; the largest log-prob difference from the unmerged eager rollout beside the
    PPO clip range (1e-4); and the time the compiled merged rollout spends inside the kernels
    compile calls and cannot change (``step --profile``'s), the bound on any rollout's speed-up."""
    device = torch.device(args.device)
    rows = {family: _merge_rollouts(family, args, device) for family in args.families}
    return {"batch": args.batch, "steps": args.steps, "families": rows}


# Kernels inductor calls rather than generates (oneDNN / MKL / attention): compile cannot make them faster.
EXTERN_KERNELS = {
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::cudnn_convolution", "aten::mm", "aten::addmm",
    "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_backward", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_efficient_attention_backward", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_cudnn_attention_backward"}


def _extern_seconds(fn: Callable[[], float]) -> float:
    """CPU seconds one call of ``fn`` spends inside :data:`EXTERN_KERNELS` (the profiler's self times)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in EXTERN_KERNELS) / 1e6


def step(args: argparse.Namespace) -> dict[str, Any]:
    from step_overhead import _step, _timed, set_up

    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward

    device = torch.device(args.device)
    reward = load_reward(RewardConfig(name="clip", path=args.reward_path), device)
    results: dict[str, Any] = {}
    print(f"step: {device}, {torch.get_num_threads()} threads, {args.batch} prompts a micro-batch, "
          f"{args.num_steps} sampling steps; median of {args.repeats}")
    head = "| method | eager (ms) | compiled (ms) | speed-up | compile (s) |"
    rule = "|---|---|---|---|---|"
    if args.profile:
        head += " extern kernels (ms) | rest eager (ms) | rest compiled (ms) | bound |"
        rule += "---|---|---|---|"
    if args.bf16:
        head += " bf16 eager | bf16 compiled | speed-up |"
        rule += "---|---|---|"
    print(head + "\n" + rule)
    for name in args.methods:
        s = set_up(name, reward, args, device)
        backbone, method, batch, params, path = s.backbone, s.method, s.batch, s.params, s.path
        eager = backbone.unwrapped_denoiser
        backbone.compile_denoiser(warmup=0)  # compiled from the first call: the warm-up call below compiles
        compiled = backbone.denoiser

        def timed(module: torch.nn.Module, bf16: bool, backbone: Any = backbone, method: Any = method,
                  batch: Any = batch, params: list[Any] = params) -> Callable[[], float]:
            def run() -> float:
                backbone.denoiser = module
                with _autocast(device, bf16) if bf16 else contextlib.nullcontext():
                    return _timed(lambda: _step(method, batch), params, device)
            return run

        fns = {"eager": timed(eager, False), "compiled": timed(compiled, False)}
        if args.bf16:
            fns |= {"eager bf16": timed(eager, True), "compiled bf16": timed(compiled, True)}
        first = {k: fn() for k, fn in fns.items()}
        median = _medians(fns, args.repeats)
        row = {"backbone": path, "seconds": median, "first_call": first,
               "speedup": median["eager"] / median["compiled"]}
        line = (f"| {name} | {median['eager'] * 1e3:.1f} | {median['compiled'] * 1e3:.1f} | {row['speedup']:.2f} | "
                f"{first['compiled']:.1f} |")
        if args.profile:  # what compile can act on: everything but the extern kernels
            extern = {k: _extern_seconds(fns[k]) for k in ("eager", "compiled")}
            rest = {k: median[k] - extern[k] for k in extern}
            row |= {"extern_seconds": extern, "rest_seconds": rest, "bound": median["eager"] / extern["eager"]}
            line += (f" {extern['eager'] * 1e3:.0f} / {extern['compiled'] * 1e3:.0f} | {rest['eager'] * 1e3:.0f} | "
                     f"{rest['compiled'] * 1e3:.0f} | {row['bound']:.2f} |")
        if args.bf16:
            row["speedup_bf16"] = median["eager bf16"] / median["compiled bf16"]
            line += (f" {median['eager bf16'] * 1e3:.1f} | {median['compiled bf16'] * 1e3:.1f} | "
                     f"{row['speedup_bf16']:.2f} |")
        print(line, flush=True)
        results[name] = row
    if args.profile:
        print("extern kernels: convolutions, matrix products and attention (oneDNN / MKL), which inductor calls and "
              "does not generate; rest: the step's time outside them (generated or ATen elementwise and "
              "normalisation kernels, Python); bound: eager over extern, the speed-up were the rest free")
    return {"batch": args.batch, "num_steps": args.num_steps, "methods": results}


def levers(args: argparse.Namespace) -> dict[str, Any]:
    """The standard levers beside compile and bf16, each against its absence: fused AdamW over
    torch's default on the shapes SD UNet's LoRA (the main job's) and on all its weights (full
    fine-tuning); channels-last memory for the UNet and its inputs in Diffusion-DPO's step (fp32
    and bf16); TF32 for fp32 matrix products (CUDA only)."""
    from step_overhead import _step, _timed, set_up

    from genalign.core.experiment import BackboneConfig, RewardConfig
    from genalign.core.optimization import fusable
    from genalign.pipelines import load_backbone
    from genalign.rewards import load_reward

    device = torch.device(args.device)
    out: dict[str, Any] = {}
    print(f"levers: {device}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| lever | workload | without (ms) | with (ms) | speed-up |\n|---|---|---|---|---|")

    def report(lever: str, workload: str, times: dict[str, float]) -> None:
        out[f"{lever}: {workload}"] = times | {"speedup": times["without"] / times["with"]}
        print(f"| {lever} | {workload} | {times['without'] * 1e3:.2f} | {times['with'] * 1e3:.2f} | "
              f"{times['without'] / times['with']:.2f} |", flush=True)

    for finetune in ("lora", "full"):
        backbone = load_backbone(BackboneConfig(family="sd", path=args.sd, finetune=finetune, lora_rank=8, lora_alpha=8),
                                 device)
        params = backbone.trainable_parameters()
        if not fusable(params):
            print(f"| fused AdamW | {finetune} | - | - | (no fused kernel on {device.type}) |")
            continue

        def adamw(fused: bool, params: list[Any] = params) -> Callable[[], float]:
            copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
            for c in copies:
                c.grad = torch.randn_like(c)
            optimizer = torch.optim.AdamW(copies, lr=1e-4, fused=fused or None)
            optimizer.step()  # allocates the state

            def run() -> float:
                _sync(device)
                start = time.perf_counter()
                optimizer.step()
                _sync(device)
                return time.perf_counter() - start
            return run

        count = sum(p.numel() for p in params)
        report("fused AdamW", f"shapes SD {finetune} ({count / 1e6:.2f} M weights)",
               _medians({"without": adamw(False), "with": adamw(True)}, 5 * args.repeats))
        del backbone, params

    reward = load_reward(RewardConfig(name="clip", path=args.reward_path), device)
    s = set_up("diffusion_dpo", reward, args, device)
    unet = s.backbone.unwrapped_denoiser
    for bf16 in (False, True):
        def dpo(channels_last: bool, bf16: bool = bf16) -> Callable[[], float]:
            def run() -> float:
                unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                with _autocast(device, bf16):
                    return _timed(lambda: _step(s.method, _channels_last(s.batch, channels_last)), s.params, device)
            return run

        report("channels-last", "Diffusion-DPO step, shapes SD" + (", bf16" if bf16 else ""),
               _medians({"without": dpo(False), "with": dpo(True)}, args.repeats))
    unet.to(memory_format=torch.contiguous_format)

    if device.type == "cuda":
        a, b = torch.randn(4096, 4096, device=device), torch.randn(4096, 4096, device=device)

        def matmul(tf32: bool) -> Callable[[], float]:
            def run() -> float:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                _sync(device)
                start = time.perf_counter()
                for _ in range(10):
                    a @ b
                _sync(device)
                return (time.perf_counter() - start) / 10
            return run

        report("TF32", "fp32 4096 x 4096 matmul", _medians({"without": matmul(False), "with": matmul(True)},
                                                          args.repeats))
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        print("| TF32 | - | - | - | (CUDA only) |")
    return out


def _channels_last(batch: Any, on: bool) -> Any:
    """``batch`` with its 4-d tensors in channels-last memory (``on``) or contiguous."""
    import dataclasses

    form = torch.channels_last if on else torch.contiguous_format

    def convert(value: Any) -> Any:
        return value.contiguous(memory_format=form) if isinstance(value, torch.Tensor) and value.dim() == 4 else value

    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **{f.name: convert(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
    if isinstance(batch, dict):
        return {k: convert(v) for k, v in batch.items()}
    return batch


SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero",
           "masked_select", "unique", "repeat_interleave"}


def syncs(args: argparse.Namespace) -> dict[str, Any]:
    """Host syncs inside each method's step, by the genalign line that asks: tensor calls that
    read values on the host or size an output by them (``item``, ``bool``, ``cpu``, ``nonzero``,
    boolean-mask indexing ...), counted by a torch function mode over the loss + backward of one
    collected micro-batch and over one rollout (``collect``). On a CPU they cost nothing; on a GPU
    each one waits for the queued kernels. An upper count: a call on a tensor that already lives
    on the host is counted too."""
    import collections
    import traceback

    from step_overhead import _step, set_up
    from torch.overrides import TorchFunctionMode

    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward

    class Counter(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.sites: collections.Counter[str] = collections.Counter()

        def __torch_function__(self, func: Any, types: Any, fargs: Any = (), kwargs: Any = None) -> Any:
            name = getattr(func, "__name__", "")
            index = fargs[1] if name in ("__getitem__", "__setitem__") and len(fargs) > 1 else ()
            masks = [i for i in (index if isinstance(index, tuple) else (index,))
                     if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
            if name in SYNCING or masks:
                ours = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}genalign{os.sep}" in f.filename]
                where = f"{Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].lineno}" if ours else "?"
                self.sites[f"{where} ({name})"] += 1
            return func(*fargs, **(kwargs or {}))

    device = torch.device(args.device)
    reward = load_reward(RewardConfig(name="clip", path=args.reward_path), device)
    results: dict[str, Any] = {}
    for name in args.methods:
        s = set_up(name, reward, args, device)
        with Counter() as step_syncs:
            _step(s.method, s.batch)
        with Counter() as rollout_syncs, torch.no_grad():
            s.method.collect(["a red circle", "two blue squares"], torch.Generator().manual_seed(0))
        results[name] = {"step": dict(step_syncs.sites), "rollout": dict(rollout_syncs.sites)}
        print(f"{name}: {sum(step_syncs.sites.values())} in the step (loss + backward), "
              f"{sum(rollout_syncs.sites.values())} in a rollout of 2 prompts, {args.num_steps} steps")
        for site, count in sorted(step_syncs.sites.items()):
            print(f"  step     {count:3d}  {site}")
        for site, count in sorted(rollout_syncs.sites.items()):
            print(f"  rollout  {count:3d}  {site}")
    return {"num_steps": args.num_steps, "methods": results}


def _images_method(name: str, backbone: Any, args: argparse.Namespace) -> tuple[Any, int]:
    """The method of an ``images`` row and the images one iteration makes."""
    from types import SimpleNamespace

    from peak_memory import _Brightness

    from genalign.core.experiment import SampleConfig

    if name == "flow_grpo":  # flow_grpo's SD3.5-M GenEval recipe: groups of 24, 10 steps, CFG 4.5, noise 0.7
        from genalign.finetuners.flow_grpo import FlowGRPO, FlowGRPOConfig

        config = FlowGRPOConfig(samples_per_prompt=args.group, minibatches=max(1, args.group // 8), beta=0.0)
        sample = SampleConfig(num_steps=args.num_steps, guidance_scale=4.5, eta=0.7)
        return FlowGRPO.build(SimpleNamespace(method=config, sample=sample), backbone, _Brightness()), args.group
    from genalign.finetuners.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig

    sample = SampleConfig(num_steps=args.num_steps, guidance_scale=5.0)
    method = DiffusionDPO(DiffusionDPOConfig(pairs_from="policy", samples_per_prompt=2), backbone, _Brightness(), sample)
    return method, 2 * args.prompts


def images(args: argparse.Namespace) -> dict[str, Any]:
    """Images per second of a whole training iteration (rollouts with log-probs or pairs, the loss
    and backward, clipping, AdamW), eager and compiled, on random-weight models of real sizes."""
    from types import SimpleNamespace

    from peak_memory import sized_backbone

    from genalign.core.trainer import loss_and_backward

    device = torch.device(args.device)
    rows = {"sd35m": "flow_grpo", "sdxl": "diffusion_dpo"}
    sizes = {"sd35m": "SD3.5-Medium-sized transformer", "sdxl": "SDXL-sized UNet"}
    results: dict[str, Any] = {}
    print(f"images: {device}, {args.dtype}, {args.latent}x{args.latent} latents ({8 * args.latent} px through a real "
          f"VAE; the stand-in VAE here is two blocks), {args.num_steps} sampling steps, LoRA r8"
          + (" + checkpointing" if args.checkpointing else "") + f"; median of {args.repeats}")
    print("| model | method | images an iteration | setting | seconds | images / s | first (s) |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        spec = SimpleNamespace(model=model, latent=args.latent, dtype=args.dtype, device=args.device, attention="sdpa",
                               latent_frames=2)
        backbone = sized_backbone(spec, "lora", args.checkpointing)
        method, count = _images_method(rows[model], backbone, args)
        params = list(method.named_trainable_parameters().values())
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        prompts = [f"a photo of prompt {i}" for i in range(1 if rows[model] == "flow_grpo" else args.prompts)]
        eager = backbone.unwrapped_denoiser
        modules = {"eager": eager}
        if "compiled" in args.settings:
            backbone.compile_denoiser("all", warmup=0)
            modules["compiled"] = backbone.denoiser
        modules = {k: v for k, v in modules.items() if k in args.settings}

        def iteration(module: Any, backbone: Any = backbone, method: Any = method, params: list[Any] = params,
                      optimizer: Any = optimizer, prompts: list[str] = prompts) -> float:
            backbone.denoiser = module
            _sync(device)
            start = time.perf_counter()
            with _autocast(device, args.dtype == "bfloat16"):
                with torch.no_grad():
                    batch = method.collect(prompts, torch.Generator().manual_seed(0))
                loss_and_backward(method, batch, torch.Tensor.backward)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            return time.perf_counter() - start

        fns = {name: (lambda m=module: iteration(m)) for name, module in modules.items()}
        first = {name: fn() for name, fn in fns.items()}
        median = _medians(fns, args.repeats)
        results[model] = {"method": rows[model], "images": count, "seconds": median, "first_call": first,
                          "images_per_second": {k: count / v for k, v in median.items()}}
        for name, seconds in median.items():
            print(f"| {sizes[model]} | {rows[model]} | {count} | {name} | {seconds:.2f} | {count / seconds:.2f} | "
                  f"{first[name]:.1f} |", flush=True)
        if "compiled" in median:
            print(f"  compiled / eager: {median['eager'] / median['compiled']:.2f}" if "eager" in median else "")
        del backbone, method, optimizer, modules, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"latent": args.latent, "num_steps": args.num_steps, "dtype": args.dtype, "models": results}


def _gold(eval_dir: Path) -> dict[str, Any]:
    scores = json.loads((eval_dir / "scores.json").read_text())
    return {key: scores[key] for key in ("gold", "base", "gain")}


def _finish(label: str, run: Path, process: Any, start: float, result: dict[str, Any]) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{label}: training failed (exit {process.returncode})")
    result[label] = {"train_seconds": time.perf_counter() - start, "run": str(run)}
    print(f"{label}: trained in {result[label]['train_seconds']:.0f} s", flush=True)


def job(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"shipped": [], "unmerged": ["backbone.merge_lora=false"], "compile": ["backbone.compile=sampling"],
                "bf16": ["run.mixed_precision=bf16"], "compile+bf16": ["backbone.compile=sampling", "run.mixed_precision=bf16"]}
    runs = [(name, settings[name], False) for name in args.settings]
    runs += [(name, settings[name], True) for name in args.warm]  # again, with the kernels its cold run compiled
    genalign = [sys.executable, "-m", "genalign"]
    result: dict[str, Any] = {}
    side_by_side = args.side_by_side
    if side_by_side and any(warm for _, _, warm in runs):
        raise SystemExit("--side-by-side runs cold settings only")
    with tempfile.TemporaryDirectory() as caches:
        started: list[tuple[str, Path, Any, float]] = []
        for name, overrides, warm in runs:
            label = f"{name}, warm cache" if warm else name
            run = out / (name.replace("+", "-") + ("-warm" if warm else ""))
            cache = Path(caches) / name.replace("+", "-")  # a cold compile cache, as on a fresh machine
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
            threads = ["run.threads=1"] if side_by_side else []
            process = subprocess.Popen([*genalign, "train", args.config, f"run.output_dir={run}", *overrides, *threads],
                                       env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            started.append((label, run, process, time.perf_counter()))
            if not side_by_side:
                _finish(*started.pop(), result)
        while started:  # side by side: the machine's drift slows every setting alike; each timed to its own end
            done = next((entry for entry in started if entry[2].poll() is not None), None)
            if done is None:
                time.sleep(0.5)
                continue
            started.remove(done)
            _finish(*done, result)
        order = [f"{name}, warm cache" if warm else name for name, _, warm in runs]
        result = {label: result[label] for label in order}  # the first setting is 1.00, whichever ended first
        for row in result.values():
            run = Path(row.pop("run"))
            subprocess.run([*genalign, "eval", "shapes", "--backbone", "models/shapes/sd", "--clip",
                            "models/shapes/clip", "--lora", str(run / "final" / "pytorch_lora_weights.safetensors"),
                            "--with-base", "--out", str(run / "eval")], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            row["eval"] = _gold(run / "eval")
    base = next(iter(result.values()))
    how = "side by side, 1 thread each" if side_by_side else f"one after the other, {torch.get_num_threads()} threads"
    print(f"main job ({args.config}), {how}; over {next(iter(result))}:")
    print("| setting | training (s) | speed-up | held-out gold (base -> tuned) | gain (SE) |")
    print("|---|---|---|---|---|")
    for name, row in result.items():
        gold = row["eval"]
        row["speedup"] = base["train_seconds"] / row["train_seconds"]
        print(f"| {name} | {row['train_seconds']:.0f} | {row['speedup']:.2f} | {gold['base']['gold']['overall']:.3f} -> "
              f"{gold['gold']['overall']:.3f} | {gold['gain']['gain']:+.3f} ({gold['gain']['standard_error']:.3f}) |")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("rollout")
    p.add_argument("--backbone", default="models/shapes/sd")
    p.add_argument("--family", default="sd")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16)
    p = sub.add_parser("merge")
    p.add_argument("--families", nargs="+", default=["sd", "sd3"], choices=["sd", "sd3"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    from step_overhead import METHODS

    def shapes_models(p: argparse.ArgumentParser, batch: int, steps: int, methods: bool = True) -> None:
        """The options of a bench on the shapes models (step_overhead.set_up's arguments)."""
        if methods:
            p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
        p.add_argument("--sd", default="models/shapes/sd")
        p.add_argument("--sd3", default="models/shapes/sd3")
        p.add_argument("--reward-path", default="models/shapes/clip")
        p.add_argument("--batch", type=int, default=batch, help="prompts per micro-batch")
        p.add_argument("--num-steps", type=int, default=steps)

    p = sub.add_parser("step")
    shapes_models(p, 8, 8)
    p.add_argument("--bf16", action="store_true", help="also both under bf16 autocast")
    p.add_argument("--profile", action="store_true",
                   help="also the time inside extern kernels (profiler), and the bound it puts on compile's speed-up")
    shapes_models(sub.add_parser("levers"), 8, 8, methods=False)
    shapes_models(sub.add_parser("syncs"), 4, 4)
    p = sub.add_parser("images")
    p.add_argument("--models", nargs="+", default=["sd35m", "sdxl"], choices=["sd35m", "sdxl"],
                   help="sd35m: Flow-GRPO on an SD3.5-Medium-sized transformer; sdxl: Diffusion-DPO on an SDXL-sized UNet")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px through the real VAE)")
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--group", type=int, default=24, help="Flow-GRPO: images a prompt")
    p.add_argument("--prompts", type=int, default=4, help="Diffusion-DPO: prompts an iteration (2 images each)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--settings", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p = sub.add_parser("job")
    p.add_argument("--config", default="configs/shapes/diffusion_dpo.yaml")
    p.add_argument("--out-dir", default="runs/speed-job")
    p.add_argument("--settings", nargs="+", default=["shipped", "bf16", "compile+bf16"],
                   choices=["shipped", "unmerged", "compile", "bf16", "compile+bf16"],
                   help="each from a cold compile cache; the first is 1.00 (unmerged: backbone.merge_lora=false)")
    p.add_argument("--side-by-side", action="store_true",
                   help="train the settings at once, one thread each (a drifting machine slows them alike); "
                        "otherwise one after the other at --threads")
    p.add_argument("--warm", nargs="*", default=[], choices=["compile", "bf16", "compile+bf16"],
                   help="then these again, with the compile cache their cold run left (a second run on a machine)")
    for p in sub.choices.values():
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: genalign's automatic count)")
        p.add_argument("--out", help="JSON results (default bench/results/speed_<bench>.json)")
    args = parser.parse_args(argv)
    from genalign.core.speed import set_threads

    set_threads(args.threads)
    result = {"rollout": rollout, "step": step, "levers": levers, "syncs": syncs, "images": images, "job": job,
              "merge": merge}[args.bench](args)
    result |= {"device": args.device, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out or f"bench/results/speed_{args.bench}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
