"""``genalign shapes build | prompts`` and ``genalign eval shapes``: the embedded shapes world."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from genalign.cli.options import add_model, load_model, positive_int


def add_commands(groups: dict[str, Any]) -> None:
    shapes = groups["root"].add_parser("shapes", help="the embedded shapes world").add_subparsers(
        dest="shapes_command", required=True)
    p = shapes.add_parser("build", help="train the world's tiny SD, SD3 and CLIP models from scratch (seeded)")
    p.add_argument("--out", default="models/shapes")
    p.add_argument("--seed", type=int, default=None)
    for name in ("dataset_size", "batch_size", "vae_steps", "sd_steps", "flow_steps", "clip_steps", "edit_steps",
                 "edit_dataset_size", "edit_batch_size", "text_steps", "text_dataset_size", "text_batch_size",
                 "ocr_steps", "ocr_batch_size", "video_steps", "video_dataset_size", "video_batch_size",
                 "video_vae_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=positive_int, default=None)
    p.add_argument("--stages", type=lambda text: tuple(text.split(",")), default=None,
                   help="comma-separated subset of sd,flow,clip,edit,text,ocr,video_vae,video (later stages alone reuse the saved "
                        "sd/; only when named: edit, the FLUX.1 Kontext editing model, kontext/; text, the text task's "
                        "FLUX model and its GOT-OCR reader, text/; ocr, that reader alone, text/ocr/; video_vae and "
                        "video, the moving-shapes world's Wan 2.1 model, video/: its VAE, then the rest on the saved "
                        "VAE)")
    p.set_defaults(func=cmd_shapes_build)

    p = shapes.add_parser("prompts", help="write shapes-world prompts as a GenEval metadata file")
    p.add_argument("out", help="output .jsonl")
    p.add_argument("--per-task", type=positive_int, default=50)
    p.add_argument("--split", default="heldout", choices=("train", "heldout"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_shapes_prompts)

    p = groups["eval"].add_parser("shapes", help="gold score of a model on the shapes world's held-out prompts")
    add_model(p, "a shapes model (diffusers folder)", default="models/shapes/sd", dtype=False)
    p.add_argument("--per-task", type=positive_int, default=50, help="prompts per task")
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="whose prompts: the held-out ones (report) or the training ones (choose settings on these)")
    p.add_argument("--clip", help="also report the proxy reward and how often this CLIP's top-1 prompt is right")
    p.add_argument("--with-base", action="store_true", help="score the base model too (same seeds), before vs after")
    p.add_argument("--diversity", type=positive_int, metavar="K",
                   help="also report sample diversity: mean pairwise pixel distance of K images a prompt")
    p.add_argument("--out", default="runs/eval-shapes")
    p.set_defaults(func=cmd_eval_shapes)


def cmd_shapes_build(args: argparse.Namespace) -> int:
    from genalign.shapes.build import BuildConfig, build

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)
                 if getattr(args, f.name, None) is not None}
    log = build(BuildConfig(**overrides))
    print(f"built the shapes world's models in {log['seconds']:.0f} s under {args.out}")
    return 0


def cmd_shapes_prompts(args: argparse.Namespace) -> int:
    from genalign.eval.geneval import write_metadata
    from genalign.shapes.world import evaluation_set

    metas = evaluation_set(args.split, per_task=args.per_task, seed=args.seed)
    write_metadata(args.out, metas)
    print(f"wrote {len(metas)} GenEval metadata rows ({args.per_task} a task, {args.split} prompts) to {args.out}")
    return 0


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from genalign.core.config import ConfigError
    from genalign.shapes.report import evaluate_models, report_lines, write_report

    if args.with_base and not args.lora:
        raise ConfigError("--with-base compares the base model with --lora; give --lora")
    lora, args.lora = args.lora, None  # the base is scored first when asked; evaluate_models loads the LoRA
    backbone = load_model(args)
    result, models = evaluate_models(backbone, lora, args.with_base, args.per_task, args.steps, args.guidance_scale,
                                     args.seed, args.clip, args.diversity, args.split)
    result["backbone"] = args.backbone
    print("\n".join(report_lines(result)))
    out = Path(args.out)
    grid = write_report(out, result, models)
    layout = "one task a row, base above fine-tuned" if args.with_base else "one task a row"
    print(f"wrote {grid} ({layout}) and {out / 'scores.json'}")
    return 0
