"""``genalign demo``: its arguments and what running it does (argparse only at import)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genalign.core.config import ConfigError
from genalign.demo.config import DemoConfig, parse_backbones, parse_rewards, parse_variants


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``genalign demo`` options."""
    models = parser.add_argument_group("models (the page loads nothing else)")
    models.add_argument("--backbone", action="append", required=True, metavar="[NAME=]PATH",
                        help="a diffusers checkpoint (local folder or hub id); repeat for a menu of backbones")
    from genalign.pipelines import BACKBONES

    models.add_argument("--family", action="append", default=[], choices=("auto", *BACKBONES.names()),
                        help="model family: once for all backbones or once per --backbone (default auto: from the "
                             "folder's model_index.json; turbo checkpoints need it)")
    models.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                        help="a fine-tuned variant: LoRA file or folder, run folder (its final/), trainer checkpoint "
                             "(checkpoints/step-N) or full denoiser folder; repeatable")
    models.add_argument("--reward", action="append", default=[], metavar="NAME[=PATH]",
                        help="a reward adapter to score with (genalign.rewards name) and its weights; repeatable")
    models.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    models.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    page = parser.add_argument_group("the page")
    page.add_argument("--pairs", metavar="DIR", help="pairs folder from `genalign d3po sample` to label")
    page.add_argument("--labels", metavar="FILE", help="labels JSONL (default: <pairs>/labels.jsonl)")
    page.add_argument("--prompt-file", help="the gallery's prompt list (one prompt a line)")
    page.add_argument("--out", default="runs/demo", help="folder for downloads (grids, scores)")
    page.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                      help="another folder the page may read variants, prompt files and pairs from")
    page.add_argument("--steps", type=_positive_int, default=20, help="default denoising steps")
    page.add_argument("--guidance-scale", type=float, default=5.0, help="default guidance (shapes models: 2)")
    page.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward batch")
    page.add_argument("--max-images", type=_positive_int, default=256, help="images one click may ask for")
    page.add_argument("--reno-steps", type=_positive_int, default=4, help="generator steps under ReNO")
    page.add_argument("--reno-iterations", type=int, default=10, help="ReNO reward evaluations, the first on the starting noise (paper: 50)")
    page.add_argument("--reno-lr", type=float, default=5.0)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 exposes it to the network)")
    server.add_argument("--port", type=int, default=7860)
    server.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """A checked :class:`DemoConfig`; bad arguments are a ConfigError before anything loads."""
    for name, value in (("--pairs", args.pairs), ("--prompt-file", args.prompt_file)):
        if value and not Path(value).exists():
            raise ConfigError(f"{name} {value}: not found")
    if args.pairs and not (Path(args.pairs) / "pairs.jsonl").is_file():
        raise ConfigError(f"--pairs {args.pairs}: no pairs.jsonl (write it with `genalign d3po sample`)")
    for root in args.allow_root:
        if not Path(root).is_dir():
            raise ConfigError(f"--allow-root {root}: not a folder")
    return DemoConfig(
        backbones=parse_backbones(args.backbone, args.family),
        variants=parse_variants(args.variant),
        rewards=parse_rewards(args.reward),
        pairs_dir=args.pairs,
        labels=args.labels,
        prompt_file=args.prompt_file,
        out_dir=args.out,
        allow_roots=list(args.allow_root),
        device=args.device,
        dtype=args.dtype,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        max_images=args.max_images,
        reno_steps=args.reno_steps,
        reno_iterations=args.reno_iterations,
        reno_lr=args.reno_lr,
        host=args.host,
        port=args.port,
        share=args.share,
    )


def run(args: argparse.Namespace) -> int:
    """Serve the demo until interrupted; 2 when gradio is missing (ConfigError for bad arguments)."""
    from genalign.demo.app import DemoUnavailable, build_app, import_gradio, launch

    config = config_from_args(args)
    try:
        import_gradio()
    except DemoUnavailable as err:
        print(f"genalign demo: {err}", file=sys.stderr)
        return 2
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"genalign demo: serving on {config.host}: anyone who can reach this address can use the page",
              file=sys.stderr)
    launch(build_app(config), config, block=True)
    return 0
