"""``genalign train`` (a YAML experiment, dotted overrides, resume) and ``genalign d3po sample``."""

from __future__ import annotations

import argparse
from pathlib import Path

from genalign.cli.options import device, positive_int
from genalign.core.config import ConfigError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune with a YAML experiment config")
    p.add_argument("config", nargs="?", help="experiment YAML (configs/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.beta=2500 run.steps=200")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint of run.output_dir, or from the checkpoint folder given")
    p.add_argument("--resume-from", metavar="CHECKPOINT", help=argparse.SUPPRESS)  # older spelling of --resume PATH
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("d3po", help="D3PO's human-feedback loop")
    d3po = p.add_subparsers(dest="d3po_command", required=True)
    p = d3po.add_parser("sample", help="write pairs of trajectories (and their images) for labelling")
    p.add_argument("config", help="the experiment YAML (backbone, sample and run.prompts are used)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sample.eta=1.0")
    p.add_argument("--out", required=True, help="folder for pairs.jsonl, images/ and trajectories/ (appended to)")
    p.add_argument("--num-pairs", type=positive_int, default=16)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lora", help="sample from this LoRA (a later round of the loop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_d3po_sample)


def cmd_train(args: argparse.Namespace) -> int:
    from genalign.core.experiment import load_experiment
    from genalign.finetuners import config_classes
    from genalign.launch import run_experiment

    if args.help_config:
        return help_config()
    if args.resume and args.resume.endswith((".yaml", ".yml")) and (not args.config or "=" in args.config):
        # `train --resume exp.yaml key=value`: argparse gave the YAML to --resume; it is the config
        args.overrides = [args.config, *args.overrides] if args.config else args.overrides
        args.config, args.resume = args.resume, "latest"
    if not args.config:
        raise ConfigError("genalign train needs a config file (see configs/)")
    run_experiment(load_experiment(args.config, config_classes(), args.overrides), args.resume_from or args.resume)
    return 0


def help_config() -> int:
    """Every config key of every section and method, with its default and help."""
    from genalign.core.config import describe
    from genalign.core.experiment import BackboneConfig, RewardConfig, RunConfig, SampleConfig
    from genalign.finetuners import METHODS

    for section, cls in (("backbone", BackboneConfig), ("reward", RewardConfig), ("sample", SampleConfig),
                         ("run", RunConfig)):
        print(f"[{section}]")
        print("\n".join("  " + line for line in describe(cls)))
    for name, method in sorted(METHODS.all().items()):
        print(f"[method: {name}]")
        print("\n".join("  " + line for line in describe(method.Config)))
    return 0


def cmd_d3po_sample(args: argparse.Namespace) -> int:
    """Pairs of trajectories (same initial noise, stochastic sampler) for human labelling."""
    from dataclasses import replace

    import torch

    from genalign.core.experiment import load_experiment
    from genalign.finetuners import config_classes
    from genalign.finetuners.d3po import sample_pairs
    from genalign.pipelines import load_backbone

    config = load_experiment(args.config, config_classes(), args.overrides)
    if config.sample.eta <= 0:
        raise ConfigError("d3po pairs need a stochastic sampler: set sample.eta > 0")
    torch.manual_seed(config.run.seed)
    backbone = load_backbone(replace(config.backbone, finetune="none"), device(args.device), lora=args.lora)
    out = Path(args.out)
    written = sample_pairs(backbone, config.run.load_prompts(), args.num_pairs, config.sample, out, args.seed,
                           args.batch_size)
    print(f"wrote {written} pairs to {out}: label them as JSON {{pair_id: 0 | 1 | \"tie\"}} (0: the first image "
          f"is better) and train with method.preferences=labels method.pairs_dir={out} method.labels=<file>")
    return 0
