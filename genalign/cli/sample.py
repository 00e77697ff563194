"""``genalign sample``: prompts -> image files, a grid and prompts.tsv."""

from __future__ import annotations

import argparse
from pathlib import Path

from genalign.cli.options import add_model, add_prompts, add_sampling, load_model, positive_int, read_prompts
from genalign.core.config import ConfigError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="prompts -> image files and a grid")
    add_model(p, required=True)
    add_prompts(p)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", default="runs/samples", help="output folder")
    add_sampling(p, steps=20, guidance_scale=5.0, images_per_prompt=1)
    p.add_argument("--resolution", type=positive_int, default=None)
    p.add_argument("--frames", type=positive_int, default=None,
                   help="video models: frames a video (Wan: 4k + 1; default the checkpoint's); written as NNNN.gif")
    p.add_argument("--timestep-spacing", default=None, choices=["leading", "trailing", "linspace"])
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from genalign.eval.generate import sample_prompts, write_samples

    prompts = read_prompts(args)
    if not prompts:
        raise ConfigError("no prompts: give --prompt (repeatable) or --prompt-file")
    extra = {"frames": args.frames} if args.frames else {}
    backbone = load_model(args, resolution=args.resolution, timestep_spacing=args.timestep_spacing, **extra)
    images, image_prompts = sample_prompts(backbone, prompts, args.steps, args.guidance_scale, args.eta,
                                           args.images_per_prompt, args.batch_size, args.seed,
                                           args.negative_prompt or None, progress=True)
    out = Path(args.out)
    write_samples(out, images, image_prompts)
    print(f"wrote {len(images)} {'videos' if images.ndim == 5 else 'images'} and grid.png to {out}")
    return 0
