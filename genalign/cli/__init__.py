"""``genalign`` command line. Each module adds its commands' flags (shared groups come from
:mod:`genalign.cli.options`), parses, calls the library and prints; this one dispatches and turns
the errors a user meets into one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from genalign.cli import evaluate, models, reno, sample, serve, shapes, train
from genalign.core.config import ConfigError
from genalign.core.trainer import NonFiniteError, TrainingInterrupted
from genalign.rewards.remote import RewardServiceError

OOM_HINTS = (
    "lower run.batch_size (and raise run.grad_accum to keep the effective batch)",
    "backbone.finetune=lora with a smaller backbone.lora_rank",
    "backbone.gradient_checkpointing=true",
    "run.mixed_precision=bf16 (or fp16) and backbone.dtype=bfloat16",
    "fewer sampling steps with gradients (e.g. a method's grad_last_k / timestep_fraction)",
    "a smaller backbone.resolution",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genalign", description="Reward fine-tuning of text-to-image diffusion and flow models."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    root = parser.add_subparsers(dest="command", required=True)
    sample.add_commands(root)
    train.add_commands(root)

    from genalign.demo import add_arguments as demo_arguments
    from genalign.demo import run as run_demo

    p = root.add_parser("demo", help="Gradio page: compare fine-tuned variants side by side, label D3PO pairs")
    demo_arguments(p)
    p.set_defaults(func=run_demo)
    groups = {"root": root}
    models.add_commands(groups)
    groups["eval"] = root.add_parser("eval", help="benchmark scoring").add_subparsers(dest="eval_command",
                                                                                       required=True)
    shapes.add_commands(groups)
    evaluate.add_commands(groups)
    reno.add_commands(groups)
    serve.add_commands(groups)
    return parser


def _is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; errors a user meets are one clear line (exit 2 for bad input, 1 for failed
    runs), the traceback only with ``--debug``."""
    args = build_parser().parse_args(argv)
    from genalign.core.speed import set_tf32, set_threads

    set_threads()  # this process's share of the cores (train: run.threads may ask for another count)
    set_tf32()  # fp32 sampling and scoring on GPUs (train: run.tf32 may turn it off)
    if args.debug:
        return int(args.func(args))
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"genalign: config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # missing weights, prompt files, checkpoints
        print(f"genalign: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"genalign: {err}", file=sys.stderr)
        return 1
    except RewardServiceError as err:  # a served reward that is gone or refuses: the checkpoints are intact
        print(f"genalign: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(f"genalign: {err}", file=sys.stderr)
        return 128 + err.signal_number
    except ValueError as err:  # bad values found while loading (sizes, families, schedules, images)
        print(f"genalign: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genalign: interrupted (a training run resumes with --resume)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last resort: one line, not a traceback
        if _is_out_of_memory(err):
            hints = "".join(f"\n  - {hint}" for hint in OOM_HINTS)
            print(f"genalign: out of memory: {str(err).splitlines()[0]}\nwhat usually fixes it:{hints}",
                  file=sys.stderr)
            return 1
        print(f"genalign: {type(err).__name__}: {err}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
