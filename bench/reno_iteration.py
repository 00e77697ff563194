"""ReNO's overhead over its compute floor, measured side by side in one run.

Prints the time of one ReNO iteration (generate with gradients -> decode -> reward -> regulariser ->
backward -> per-sample clip -> optimizer step -> best-so-far bookkeeping) divided by the time of the
floor on the same batch: generator forward + backward and reward forward + backward to the noise.
Timings alternate between the two and take medians (this machine is noisy; compare ratios only).

    .venv/bin/python bench/reno_iteration.py                      # the shapes SD model + proxy CLIP
    .venv/bin/python bench/reno_iteration.py --backbone stabilityai/sd-turbo --family sd-turbo \\
        --reward clip --reward-path openai/clip-vit-large-patch14 --device cuda --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genalign.core.experiment import BackboneConfig, RewardConfig
from genalign.core.sampler import initial_noise, sample
from genalign.finetuners.reno import RenoConfig, reno
from genalign.pipelines import load_backbone
from genalign.rewards import load_reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="models/shapes/sd")
    parser.add_argument("--family", default="sd")
    parser.add_argument("--reward", default="clip")
    parser.add_argument("--reward-path", default="models/shapes/clip")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    backbone = load_backbone(BackboneConfig(family=args.family, path=args.backbone, finetune="none"), device)
    reward = load_reward(RewardConfig(name=args.reward, path=args.reward_path), device)
    prompts = [f"a photo of a {c} circle" for c in ("red", "blue", "green", "yellow")] * (args.batch // 4 + 1)
    prompts = prompts[: args.batch]
    noise = initial_noise(backbone, args.batch, torch.Generator().manual_seed(0))
    cond = backbone.encode_prompts(prompts, guidance=args.guidance_scale != 1.0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def floor() -> float:
        x = noise.detach().float().clone().requires_grad_(True)
        sync()
        start = time.perf_counter()
        final = sample(backbone, cond, args.steps, args.guidance_scale, latents=x.to(backbone.dtype), grad_last_k=-1).final
        scores, _ = reward(backbone.decode(final).float().clamp(0, 1), prompts)
        scores.sum().backward()
        sync()
        return time.perf_counter() - start

    def reno_run(iterations: int) -> float:
        config = RenoConfig(num_steps=args.steps, guidance_scale=args.guidance_scale, iterations=iterations)
        sync()
        start = time.perf_counter()
        reno(backbone, reward, prompts, config, noise=noise)
        sync()
        return time.perf_counter() - start

    def reno_iteration(extra: int = 3) -> float:
        # the marginal cost of an iteration: runs of 1 and 1 + extra iterations, set-up cancels
        return (reno_run(1 + extra) - reno_run(1)) / extra

    floor(), reno_run(1)  # warm-up
    floors, iterations = [], []
    for _ in range(args.repeats):
        floors.append(floor())
        iterations.append(reno_iteration())
    f, r = statistics.median(floors), statistics.median(iterations)
    print(f"batch {args.batch}, {args.steps} generator steps, device {device}")
    print(f"floor (generator + reward, forward + backward): median {f * 1000:.1f} ms")
    print(f"one ReNO iteration:                             median {r * 1000:.1f} ms")
    print(f"ratio ReNO iteration / floor: {r / f:.3f}")


if __name__ == "__main__":
    main()
