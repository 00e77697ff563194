"""``genalign eval geneval | t2i-compbench | compare``: generate a benchmark's image layout, score
one (ours or another tool's), compare two reports."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from genalign.cli.options import add_benchmark_generation, benchmark_generator, device, positive_int
from genalign.core.config import ConfigError

OWLV2_COMPBENCH_THRESHOLD = 0.1  # transformers' OWLv2 examples; UniDet's official 0.5 is for its own scores


def add_commands(groups: dict[str, Any]) -> None:
    evals = groups["eval"]
    p = evals.add_parser("geneval", help="GenEval: generate its image layout and/or score one")
    add_benchmark_generation(p, "<OUT>/<index:05>/{metadata.jsonl,samples/NNNNN.png}", images_per_prompt=4, steps=50,
                             guidance_scale=9.0, steps_help=None, guidance_help="GenEval's SD runs: 9",
                             images_help="GenEval's protocol: 4", limit_help="only the first N prompts of --metadata")
    p.add_argument("--metadata", help="GenEval metadata for --generate (default: the official "
                   "evaluation_metadata.jsonl, shipped; `genalign shapes prompts` writes one for the shapes world)")
    p.add_argument("--score", metavar="DIR", help="score a GenEval image folder (ours or another tool's)")
    p.add_argument("--report", help="folder for results.jsonl and the reports (default: <DIR>/results)")
    p.add_argument("--detector", default="mask2former", choices=("mask2former", "owlv2", "shapes"),
                   help="shapes: the shapes world's exact parser (for shapes-world folders)")
    p.add_argument("--detector-path", help="detector weights (default: the detector's hub id)")
    p.add_argument("--clip-path", help="CLIP ViT-L/14 for the colour classifier (default: openai/clip-vit-large-patch14)")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--counting-threshold", type=float, default=0.9)
    p.add_argument("--max-objects", type=positive_int, default=16)
    p.add_argument("--max-overlap", type=float, default=1.0)
    p.add_argument("--position-threshold", type=float, default=0.1)
    p.set_defaults(func=cmd_eval_geneval)

    p = evals.add_parser("t2i-compbench", help="T2I-CompBench(++): generate its image layout and/or score it")
    add_benchmark_generation(p, "<OUT>/<category>/{prompt}_{NNNNNN}.png", images_per_prompt=10, steps=30,
                             guidance_scale=7.5, steps_help="the official SD runs: 30", guidance_help=None,
                             images_help="the official protocol: 10", limit_help="only the first N prompts of each category")
    p.add_argument("--data-dir", help="folder of {category}_{split}.txt prompt files (default: the official "
                   "validation lists, shipped)")
    p.add_argument("--split", default="val", help="prompt file suffix: {category}_{split}.txt")
    p.add_argument("--score", metavar="ROOT", help="score <ROOT>/<category>/ folders (ours or another tool's)")
    p.add_argument("--category", action="append", help="a category (repeatable; default: all eight)")
    p.add_argument("--report", help="folder for scores.json and the reports (default: <ROOT>/results)")
    p.add_argument("--detector", default="owlv2", choices=("owlv2", "mask2former"),
                   help="stands in for UniDet (spatial, complex, numeracy, 3d_spatial); the default OWLv2 is open "
                        "vocabulary (COCO's 80 classes name both objects of 80 of the 300 spatial prompts)")
    p.add_argument("--detector-path", help="detector weights (default: the detector's hub id)")
    p.add_argument("--detection-threshold", type=float,
                   help="detector confidence kept (default: the official 0.5 for mask2former; 0.1 for owlv2, the "
                        "threshold of transformers' OWLv2 examples, not calibrated against UniDet)")
    p.add_argument("--blip", help="BLIP VQA model (default: Salesforce/blip-vqa-base)")
    p.add_argument("--clip", help="CLIP for non-spatial / complex (default: openai/clip-vit-base-patch32)")
    p.add_argument("--depth", help="depth model for 3d_spatial (default: Intel/dpt-hybrid-midas, the official DPT-Hybrid)")
    p.set_defaults(func=cmd_eval_t2i_compbench)

    p = evals.add_parser("compare", help="two scoring runs side by side with the differences")
    p.add_argument("run_a", help="a report folder (or its scores.json)")
    p.add_argument("run_b")
    p.set_defaults(func=cmd_eval_compare)


def cmd_eval_geneval(args: argparse.Namespace) -> int:
    from genalign.core.geneval import GenEvalOptions
    from genalign.core.reference_data import geneval_metadata
    from genalign.eval import geneval
    from genalign.eval.report import markdown_table, write_report

    if not args.generate and not args.score:
        raise ConfigError("give --generate OUT (with --backbone) and/or --score DIR")
    if args.generate:
        metas = geneval.read_metadata(args.metadata or geneval_metadata())[: args.limit]
        geneval.generate(benchmark_generator(args), metas, args.generate, args.images_per_prompt, args.seed,
                         args.batch_size)
        print(f"wrote {len(metas)} prompts x {args.images_per_prompt} images in GenEval's layout to {args.generate}")
    if not args.score:
        return 0
    options = GenEvalOptions(args.threshold, args.counting_threshold, args.max_objects, args.max_overlap,
                             args.position_threshold)
    detector, colors = load_detectors(args.detector, args.detector_path, args.clip_path, device(args.device))
    rows, records = geneval.score_folder(args.score, detector, colors, options, args.batch_size)
    out = Path(args.report or Path(args.score) / "results")
    out.mkdir(parents=True, exist_ok=True)
    geneval.write_results(out / "results.jsonl", rows)
    summary = geneval.summary(rows)
    summary["detector"] = args.detector
    summary["detector_weights"] = args.detector_path or getattr(detector, "default_path", args.detector)
    scale = getattr(detector, "scale", None)  # an optional attribute of a Detector
    if scale:
        summary["detector_scale"] = scale
    summary["options"] = dataclasses.asdict(options)
    write_report(out, summary, records)
    print(markdown_table(summary), end="")
    print(f"wrote {out / 'results.jsonl'} (official format), scores.json, report.md, report.html")
    return 0


def load_detectors(name: str, path: str | None, clip_path: str | None, dev: Any) -> tuple[Any, Any]:
    """(detector, colour classifier or None): ``mask2former`` / ``owlv2`` with the CLIP colour
    classifier, or ``shapes`` (the shapes world's exact parser, which knows each object's colour)."""
    if name == "shapes":
        from genalign.shapes.evaluator import ShapesDetector

        return ShapesDetector(), None
    from genalign.rewards.detection import load_color_classifier, load_detector

    return load_detector(name, path, dev), load_color_classifier(clip_path, dev)


def cmd_eval_t2i_compbench(args: argparse.Namespace) -> int:
    from genalign.core.reference_data import t2i_compbench_dir
    from genalign.eval import t2i_compbench as cb
    from genalign.eval.report import markdown_table, write_report

    if not args.generate and not args.score:
        raise ConfigError("give --generate OUT (with --backbone) and/or --score ROOT")
    categories = args.category or list(cb.CATEGORIES)
    for category in categories:
        if category not in cb.CATEGORIES:
            raise ConfigError(f"unknown T2I-CompBench category {category!r}; known: {', '.join(cb.CATEGORIES)}")
    data_dir = args.data_dir or t2i_compbench_dir()
    if args.generate:
        generator = benchmark_generator(args)
        for category in categories:
            prompts = cb.read_prompts(cb.prompt_file(data_dir, category, args.split))[: args.limit]
            folder = cb.generate(generator, prompts, Path(args.generate) / category, args.images_per_prompt,
                                 args.seed, args.batch_size)
            print(f"{category}: {len(prompts)} prompts x {args.images_per_prompt} images in {folder}")
    if not args.score:
        return 0
    detector = None
    if set(categories) & set(cb.DETECTOR_CATEGORIES):
        from genalign.rewards.detection import load_detector

        detector = load_detector(args.detector, args.detector_path, device(args.device))
    models = cb.CompBenchModels(detector=detector, blip=args.blip or cb.DEFAULT_BLIP, clip=args.clip or cb.DEFAULT_CLIP,
                                depth=args.depth or cb.DEFAULT_DEPTH, device=device(args.device))
    threshold = args.detection_threshold
    if threshold is None:
        threshold = OWLV2_COMPBENCH_THRESHOLD if args.detector == "owlv2" else cb.CompBenchOptions().detection_threshold
    options = cb.CompBenchOptions(detection_threshold=threshold, images_per_prompt=args.images_per_prompt,
                                  batch_size=args.batch_size)
    records, summary = cb.score_folder(args.score, categories, models, options, data_dir=data_dir)
    out = Path(args.report or Path(args.score) / "results")
    write_report(out, summary, records)
    print(markdown_table(summary), end="")
    print(f"wrote {out / 'scores.json'}, report.md, report.html")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from genalign.eval.report import compare

    print(compare(args.run_a, args.run_b), end="")
    return 0
