"""The shapes evaluator of another revision beside the current one, on the same generated images.

For each model (a base backbone, optionally with a LoRA), generate the held-out evaluation images
(`genalign eval shapes` settings) once and score them with both parsers: the gold score per task,
how many images the two judge differently, and how many images the older parser saw more objects
in. A run trained on the older parser's verdicts (reward ``shapes_gold``) that learned to exploit
it shows a gain that shrinks under the current parser, beyond the base model's own change.

    python bench/parser_comparison.py --rev 32e46f8 \\
        --model sd-base=sd:models/shapes/sd --model sd-ddpo=sd:models/shapes/sd:runs/ddpo/final/pytorch_lora_weights.safetensors

Writes ``bench/results/parser_comparison.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_evaluator(rev: str):
    """``genalign/shapes/evaluator.py`` as it was at git revision ``rev``, as a module."""
    source = subprocess.run(["git", "show", f"{rev}:genalign/shapes/evaluator.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"evaluator_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"evaluator_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="git revision of the older evaluator")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FAMILY:PATH[:LORA]")
    parser.add_argument("--per-task", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from genalign.shapes import evaluator as current
    from genalign.shapes.labelling import Source
    from genalign.shapes.scoring import generate
    from genalign.shapes.world import evaluation_set

    older = load_evaluator(args.rev)
    metas = evaluation_set("heldout", per_task=args.per_task, seed=args.seed)
    results = {}
    for source in map(Source.parse, args.model):
        name = source.name
        images = generate(source.load(), [m["prompt"] for m in metas], 25, 2.0, args.seed)
        row = {}
        for label, module in (("older", older), ("current", current)):
            detections = [module.detect(image) for image in images]
            verdicts = [module.evaluate(image, meta, found)[0] for image, meta, found in zip(images, metas, detections)]
            row[label] = {"gold": module.accuracy(verdicts, metas), "verdicts": verdicts,
                          "objects": [len(found) for found in detections]}
        row["verdicts_differ"] = int(np.sum(np.array(row["older"]["verdicts"]) != np.array(row["current"]["verdicts"])))
        row["older_sees_more_objects"] = int(np.sum(np.array(row["older"]["objects"]) > np.array(row["current"]["objects"])))
        results[name] = row
        print(f"{name}: older {row['older']['gold']['overall']:.3f}, current {row['current']['gold']['overall']:.3f}, "
              f"verdicts differ on {row['verdicts_differ']} of {len(metas)}, the older parser sees more objects in "
              f"{row['older_sees_more_objects']}", flush=True)
    out = ROOT / "bench" / "results" / "parser_comparison.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rev": args.rev, "per_task": args.per_task, "seed": args.seed, "models": results}))
    print("\n| model | gold, older parser | gold, current parser | verdicts that differ | older sees more objects |")
    print("|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['older']['gold']['overall']:.3f} | {row['current']['gold']['overall']:.3f} | "
              f"{row['verdicts_differ']} / {len(metas)} | {row['older_sees_more_objects']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
