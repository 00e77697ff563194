"""``genalign reno``: optimise the initial noise of a few-step generator for rewards (ReNO)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from genalign.cli.options import (
    add_model,
    add_prompts,
    add_rewards,
    build_rewards,
    device,
    load_model,
    positive_int,
    read_prompts,
)
from genalign.core.config import ConfigError


def add_commands(groups: dict[str, Any]) -> None:
    p = groups["root"].add_parser("reno", help="ReNO: optimise initial noises of a few-step generator for rewards")
    add_model(p, required=True)
    add_prompts(p)
    p.add_argument("--shapes-heldout", type=positive_int, help="add N held-out shapes prompts a task; report gold")
    add_rewards(p, required=True)
    p.add_argument("--steps", type=positive_int, default=1, help="generator steps (1-4)")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=50,
                   help="reward evaluations, the first on the starting noise, each but the last followed by a "
                        "step (paper: 50)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float, default=5.0, help="paper: 5 with SGD, momentum 0.9, Nesterov")
    p.add_argument("--grad-clip", type=float, default=0.1)
    p.add_argument("--reg-weight", type=float, default=0.01, help="lambda of the noise-norm regulariser")
    p.add_argument("--seeds", type=positive_int, default=1, help="initial noises per prompt (best kept)")
    p.add_argument("--patience", type=int, default=0, help="early stop after N iterations without improvement")
    p.add_argument("--batch-size", type=positive_int, default=64, help="prompts optimised together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/reno")
    p.set_defaults(func=cmd_reno)


def cmd_reno(args: argparse.Namespace) -> int:
    from genalign.finetuners.reno import RenoConfig, reno_in_batches, write_reno

    prompts, metas = read_prompts(args), None
    if args.shapes_heldout:
        from genalign.shapes.world import evaluation_set

        metas = evaluation_set("heldout", per_task=args.shapes_heldout, seed=args.seed)
        prompts += [m["prompt"] for m in metas]
    if not prompts:
        raise ConfigError("genalign reno needs prompts: --prompt, --prompt-file or --shapes-heldout")
    reward = build_rewards(args.reward, args.reward_path, args.reward_weight, "--reward", device(args.device))
    backbone = load_model(args)
    config = RenoConfig(num_steps=args.steps, guidance_scale=args.guidance_scale, iterations=args.iterations,
                        optimizer=args.optimizer, lr=args.lr, grad_clip=args.grad_clip, reg_weight=args.reg_weight,
                        seeds_per_prompt=args.seeds, patience=args.patience)
    results = reno_in_batches(backbone, reward, prompts, config, args.seed, args.batch_size, progress=True)
    gold = None
    if metas is not None:  # the shapes prompts are the last ones
        import torch

        from genalign.shapes.scoring import paired_gold

        n = len(metas)
        gold = paired_gold(torch.cat([r.initial_images for r in results])[-n:],
                           torch.cat([r.images for r in results])[-n:], metas)
    out = Path(args.out)
    summary = write_reno(out, prompts, results, config, gold)
    before, after = summary["reward_initial"], summary["reward_best"]
    print(f"reward (weighted sum) of plain samples {sum(before) / len(before):.4f} -> after ReNO "
          f"{sum(after) / len(after):.4f} ({len(prompts)} prompts, {config.seeds_per_prompt} seed(s) each)")
    if metas is not None:
        gain = summary["gold_gain"]
        print(f"gold score (held-out shapes prompts): plain {summary['gold_initial']['overall']:.3f} -> "
              f"ReNO {summary['gold_reno']['overall']:.3f}; paired gain {gain['gain']:+.3f} "
              f"(standard error {gain['standard_error']:.3f})")
    print(f"wrote {out}/images (best), {out}/initial (plain samples), noise.safetensors, reno.json, grid.png "
          "(plain row above ReNO row)")
    return 0
