"""Flag groups several commands share, defined once, and the small conversions they need."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from genalign.core.config import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def families() -> list[str]:
    """The backbone families, read from the backbone files' source (imports none of them)."""
    from genalign.pipelines import BACKBONES

    return BACKBONES.names()


def add_model(p: argparse.ArgumentParser, backbone_help: str = "diffusers checkpoint: hub id or local folder",
              required: bool = False, default: str | None = None, dtype: bool = True) -> None:
    """--backbone, --family, --lora, --dtype, --device: the model a command samples."""
    p.add_argument("--backbone", required=required, default=default, help=backbone_help)
    p.add_argument("--family", default="sd", choices=families(), help="model family of the checkpoint")
    p.add_argument("--lora", help="LoRA weights (diffusers format) to load")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--compile", default="none", choices=("none", "sampling", "all"),
                   help="torch.compile the denoiser: sampling (forwards without gradient), all (ReNO's too); "
                        "a one-off compile of minutes, worth it for long runs")


def load_model(args: argparse.Namespace, **config: Any) -> Any:
    """The backbone of :func:`add_model`'s flags, with its LoRA loaded."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone

    if not args.backbone:
        raise ConfigError("give --backbone (a diffusers checkpoint: hub id or local folder)")
    if getattr(args, "dtype", None):
        config.setdefault("dtype", args.dtype)
    config.setdefault("compile", getattr(args, "compile", "none"))
    return load_backbone(BackboneConfig(family=args.family, path=args.backbone, finetune="none", **config),
                         device(args.device), lora=args.lora)


def add_prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="text file with one prompt a line")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line.strip() for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    return prompts


def add_sampling(p: argparse.ArgumentParser, steps: int, guidance_scale: float, images_per_prompt: int,
                 batch_size: int = 8, steps_help: str | None = None, guidance_help: str | None = None,
                 images_help: str | None = None) -> None:
    """--steps, --guidance-scale, --eta, --images-per-prompt, --seed, --batch-size."""
    p.add_argument("--steps", type=positive_int, default=steps, help=steps_help)
    p.add_argument("--guidance-scale", type=float, default=guidance_scale, help=guidance_help)
    p.add_argument("--eta", type=float, default=0.0, help="stochasticity of the sampler (0: deterministic)")
    p.add_argument("--images-per-prompt", type=positive_int, default=images_per_prompt, help=images_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="prompts per forward batch")


def add_rewards(p: argparse.ArgumentParser, flag: str = "--reward", required: bool = False, weights: bool = True,
                help: str = "reward name (repeatable: a weighted sum)") -> None:
    """--reward NAME (repeatable: a weighted sum), with --reward-path and --reward-weight per reward."""
    p.add_argument(flag, action="append", default=[], required=required, help=help)
    p.add_argument(f"{flag}-path", action="append", default=[], help=f"weights of the matching {flag}")
    if weights:
        p.add_argument(f"{flag}-weight", action="append", type=float, default=[], help=f"weight of the matching {flag}")


def build_rewards(names: list[str], paths: list[str], weights: list[float], flag: str, dev: torch.device) -> Any:
    """One reward (a weighted sum when several) from :func:`add_rewards`'s flags."""
    from genalign.core.experiment import RewardConfig
    from genalign.rewards import build_reward

    if len(paths) > len(names) or len(weights) > len(names):
        raise ConfigError(f"give at most one {flag}-path and one {flag}-weight per {flag}")
    paths = list(paths) + [None] * (len(names) - len(paths))  # type: ignore[list-item]
    weights = list(weights) + [1.0] * (len(names) - len(weights))
    return build_reward([RewardConfig(name=n, path=p or None, weight=w) for n, p, w in zip(names, paths, weights)], dev)


def add_benchmark_generation(p: argparse.ArgumentParser, layout: str, images_per_prompt: int, steps: int,
                             guidance_scale: float, steps_help: str | None, guidance_help: str | None,
                             images_help: str, limit_help: str) -> None:
    """A benchmark's --generate: the model, optionally ReNO on it, and the sampling settings."""
    p.add_argument("--generate", metavar="OUT", help=f"write {layout}")
    p.add_argument("--limit", type=positive_int, help=limit_help)
    add_model(p, "diffusers checkpoint for --generate")
    add_rewards(p, "--reno-reward", weights=False,
                help="generate with ReNO optimising this differentiable reward (repeatable: a sum)")
    p.add_argument("--reno-iterations", type=int, default=50)
    p.add_argument("--reno-lr", type=float, default=5.0)
    add_sampling(p, steps, guidance_scale, images_per_prompt, steps_help=steps_help, guidance_help=guidance_help,
                 images_help=images_help)


def benchmark_generator(args: argparse.Namespace) -> Any:
    """The image generator of :func:`add_benchmark_generation`'s flags: the model, or ReNO on it."""
    from genalign.eval.generate import backbone_sampler
    from genalign.finetuners.reno import reno_sampler

    backbone = load_model(args)
    if not args.reno_reward:
        return backbone_sampler(backbone, args.steps, args.guidance_scale, args.eta)
    reward = build_rewards(args.reno_reward, args.reno_reward_path, [], "--reno-reward", device(args.device))
    return reno_sampler(backbone, reward, args.steps, args.guidance_scale, args.reno_iterations, args.reno_lr)
