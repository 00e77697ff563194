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

``job``: the README main job (``configs/shapes/diffusion_dpo.yaml``) trained three times: as shipped,
with ``run.mixed_precision=bf16``, and with ``backbone.compile=sampling`` as well, each from a cold
compile cache, then each scored by ``genalign eval shapes`` against the base (the same held-out
prompts and seeds): wall-time ratios and the gold figures.

    .venv/bin/python bench/speed.py rollout
    .venv/bin/python bench/speed.py rollout --family sd3 --backbone models/shapes/sd3 --eta 0.7
    .venv/bin/python bench/speed.py step --methods diffusion_dpo ddpo flow_grpo
    .venv/bin/python bench/speed.py job --out-dir runs/speed-job
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


def rollout(args: argparse.Namespace) -> dict[str, Any]:
    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import load_backbone

    device = torch.device(args.device)
    backbone = load_backbone(BackboneConfig(family=args.family, path=args.backbone, finetune="none"), device)
    pipe = backbone.pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square")]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    noise = initial_noise(backbone, args.batch, torch.Generator().manual_seed(0))
    eager = backbone.unwrapped_denoiser
    backbone.compile_denoiser()
    compiled = backbone.denoiser
    compiled.warmup = 0  # compiled from the first call: the warm-up round compiles
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


def step(args: argparse.Namespace) -> dict[str, Any]:
    from step_overhead import _step, _timed, set_up

    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward

    device = torch.device(args.device)
    reward = load_reward(RewardConfig(name="clip", path=args.reward_path), device)
    results: dict[str, Any] = {}
    print(f"step: {device}, {torch.get_num_threads()} threads, {args.batch} prompts a micro-batch, "
          f"{args.num_steps} sampling steps; median of {args.repeats}")
    print("| method | eager (ms) | compiled (ms) | speed-up | compile (s) |" + (" bf16 eager | bf16 compiled | speed-up |"
                                                                             if args.bf16 else ""))
    print("|---|---|---|---|---|" + ("---|---|---|" if args.bf16 else ""))
    for name in args.methods:
        s = set_up(name, reward, args, device)
        backbone, method, batch, params, path = s.backbone, s.method, s.batch, s.params, s.path
        eager = backbone.unwrapped_denoiser
        backbone.compile_denoiser()
        compiled = backbone.denoiser
        compiled.warmup = 0  # compiled from the first call: the warm-up call below compiles

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
        if args.bf16:
            row["speedup_bf16"] = median["eager bf16"] / median["compiled bf16"]
            line += (f" {median['eager bf16'] * 1e3:.1f} | {median['compiled bf16'] * 1e3:.1f} | "
                     f"{row['speedup_bf16']:.2f} |")
        print(line, flush=True)
        results[name] = row
    return {"batch": args.batch, "num_steps": args.num_steps, "methods": results}


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
            backbone.compile_denoiser("all")
            backbone.denoiser.warmup = 0
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


def job(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"shipped": [], "bf16": ["run.mixed_precision=bf16"],
                "compile+bf16": ["backbone.compile=sampling", "run.mixed_precision=bf16"]}
    genalign = [sys.executable, "-m", "genalign"]
    result: dict[str, Any] = {}
    for name, overrides in settings.items():
        run = out / name.replace("+", "-")
        with tempfile.TemporaryDirectory() as cache:  # a cold compile cache, as on a fresh machine
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
            start = time.perf_counter()
            subprocess.run([*genalign, "train", args.config, f"run.output_dir={run}", *overrides], env=env, check=True,
                           cwd=ROOT, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
        subprocess.run([*genalign, "eval", "shapes", "--backbone", "models/shapes/sd", "--clip", "models/shapes/clip",
                        "--lora", str(run / "final" / "pytorch_lora_weights.safetensors"), "--with-base",
                        "--out", str(run / "eval")], env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        result[name] = {"train_seconds": seconds, "eval": _gold(run / "eval")}
        print(f"{name}: trained in {seconds:.0f} s", flush=True)
    base = result["shipped"]
    print(f"main job ({args.config}), {torch.get_num_threads()} threads, cold compile cache:")
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
    p = sub.add_parser("step")
    from step_overhead import METHODS

    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--sd", default="models/shapes/sd")
    p.add_argument("--sd3", default="models/shapes/sd3")
    p.add_argument("--reward-path", default="models/shapes/clip")
    p.add_argument("--batch", type=int, default=8, help="prompts per micro-batch")
    p.add_argument("--num-steps", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="also both under bf16 autocast")
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
    for p in sub.choices.values():
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: genalign's automatic count)")
        p.add_argument("--out", help="JSON results (default bench/results/speed_<bench>.json)")
    args = parser.parse_args(argv)
    from genalign.core.speed import set_threads

    set_threads(args.threads)
    result = {"rollout": rollout, "step": step, "images": images, "job": job}[args.bench](args)
    result |= {"device": args.device, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out or f"bench/results/speed_{args.bench}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
