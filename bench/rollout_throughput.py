"""Rollout throughput: images with per-step log-probs per second from genalign's sampler, divided by
a plain diffusers pipeline call on the same model, prompts, steps, guidance and eta, measured side
by side in one run (alternating, medians; this machine is noisy: compare ratios only).

The genalign rollout does more than the pipeline: it records every step's latents, mean, std and
Gaussian log-probability (what DDPO / Flow-GRPO / D3PO train on) and decodes to [0, 1] tensors;
the pipeline returns latents only (``output_type="latent"``) so that both skip the same VAE work,
and the decode is timed apart. Target (issue #14): ratio >= 0.95.

    .venv/bin/python bench/rollout_throughput.py                       # shapes SD, DDIM eta 1
    .venv/bin/python bench/rollout_throughput.py --backbone models/shapes/sd3 --family sd3 --eta 0.7
    .venv/bin/python bench/rollout_throughput.py --backbone stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --dtype float16 --batch 8 --steps 50 --guidance-scale 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from genalign.core.experiment import BackboneConfig
from genalign.core.sampler import initial_noise, sample
from genalign.pipelines import load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="models/shapes/sd")
    parser.add_argument("--family", default="sd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (SD) or the flow SDE's noise level")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/rollout_throughput.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    backbone = load_backbone(BackboneConfig(family=args.family, path=args.backbone, finetune="none",
                                            dtype=args.dtype), device)
    pipe = backbone.pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of a {c} circle" for c in ("red", "blue", "green", "yellow")] * (args.batch // 4 + 1)
    prompts = prompts[: args.batch]
    noise = initial_noise(backbone, args.batch, torch.Generator().manual_seed(0))
    flow = args.family in ("sd3", "flux")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def ours() -> float:
        sync()
        start = time.perf_counter()
        cond = backbone.encode_prompts(prompts, guidance=args.guidance_scale != 1.0)
        trajectory = sample(backbone, cond, args.steps, args.guidance_scale, args.eta, latents=noise,
                            generator=torch.Generator().manual_seed(1))
        assert trajectory.log_probs is not None and trajectory.log_probs.shape[0] == args.batch
        sync()
        return time.perf_counter() - start

    @torch.no_grad()
    def pipeline() -> float:
        kwargs = {} if flow else {"eta": args.eta}  # diffusers' flow pipelines sample the ODE only
        if flow and backbone.max_sequence_length:  # the same T5 length as genalign encodes with
            kwargs["max_sequence_length"] = backbone.max_sequence_length
        sync()
        start = time.perf_counter()
        pipe(prompts, latents=noise.clone(), num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
             output_type="latent", generator=torch.Generator().manual_seed(1), **kwargs)
        sync()
        return time.perf_counter() - start

    @torch.no_grad()
    def decode() -> float:
        sync()
        start = time.perf_counter()
        backbone.decode(noise)
        sync()
        return time.perf_counter() - start

    ours(), pipeline()  # warm-up
    times: dict[str, list[float]] = {"genalign": [], "diffusers": [], "decode": []}
    for _ in range(args.repeats):
        times["genalign"].append(ours())
        times["diffusers"].append(pipeline())
        times["decode"].append(decode())
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["diffusers"] / median["genalign"]  # throughput ratio: ours / pipeline's
    result = {
        "backbone": args.backbone, "family": args.family, "steps": args.steps, "batch": args.batch,
        "guidance_scale": args.guidance_scale, "eta": args.eta, "device": args.device, "dtype": args.dtype,
        "seconds_median": median, "images_per_second": {k: args.batch / median[k] for k in ("genalign", "diffusers")},
        "throughput_ratio": ratio, "note": "diffusers flow pipelines run the ODE (no noise, no log-probs)" if flow else "",
    }
    print(f"{args.family} {args.backbone}: batch {args.batch}, {args.steps} steps, guidance {args.guidance_scale}, "
          f"eta {args.eta}, {args.device} {args.dtype}")
    print(f"  genalign rollout with log-probs: {args.batch / median['genalign']:.2f} img/s")
    print(f"  diffusers pipeline (latents):    {args.batch / median['diffusers']:.2f} img/s")
    print(f"  throughput ratio genalign / diffusers: {ratio:.3f}  (target >= 0.95); VAE decode "
          f"{median['decode'] / median['genalign']:.2f}x of a rollout")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
