"""``genalign list`` (the registered methods, backbones and rewards) and ``genalign tiny``."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(groups: dict[str, Any]) -> None:
    sub = groups["root"]
    p = sub.add_parser("list", help="the registered methods, backbones and rewards, one line each")
    p.add_argument("what", nargs="?", choices=("methods", "backbones", "rewards"), help="only this section")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("tiny", help="build a tiny random model of a family (for tests and demos)")
    p.add_argument("family", help="a tiny layout, e.g. sd, sdxl, sd3, flux, flux-schnell (each backbone family "
                                  "declares its own; an unknown name lists them)")
    p.add_argument("out", help="output folder (diffusers format)")
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"],
                   help="SD families only (flow models predict velocity)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)


def summary(cls: type) -> str:
    """A registered class's one-line summary: its ``summary`` attribute or its docstring's first line."""
    text = getattr(cls, "summary", "") or (cls.__doc__ or "").strip().split("\n")[0]
    return text.rstrip(".")


def cmd_list(args: argparse.Namespace) -> int:
    from genalign.finetuners import METHODS
    from genalign.pipelines import BACKBONES
    from genalign.rewards import REWARDS

    sections = {
        "methods (method.name)": METHODS.all(),
        "backbones (backbone.family)": BACKBONES.all(),
        "rewards (reward.name)": REWARDS.all(),
    }
    for title, registry in sections.items():
        if args.what and not title.startswith(args.what):
            continue
        print(title)
        width = max(len(name) for name in registry)
        for name in sorted(registry):
            print(f"  {name:<{width}}  {summary(registry[name])}")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from genalign.pipelines.tiny import save_tiny

    folder = save_tiny(args.family, args.out, args.prediction_type, args.seed)
    print(f"wrote a tiny random {args.family} model to {folder}")
    return 0
