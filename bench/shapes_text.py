"""The shapes text task's measured gain: a method trained on the OCR reward (the shipped tiny GOT-OCR
2.0, models/shapes/text/ocr; configs/shapes_text/, DiffusionNFT by default) on the tiny FLUX text model
(models/shapes/text), under several training seeds, each scored against the base with the exact
reader (genalign/shapes/text.py: strict, the digits read are the prompt's; characters, 1 - the
normalised edit distance) on held-out strings (two and three digits never trained on), the same
prompts and noise seeds for both; training seed s uses evaluation seed s + 1. The gain is the mean
over seeds of each seed's paired gain, with its standard error over seeds.

    python bench/shapes_text.py --seeds 0 1 2             # trains what is missing, then scores
    python bench/shapes_text.py --seeds 0 1 2 --docs docs  # and writes the block in docs/results.md

Runs live under runs/shapes-text/ (weights) and bench/shapes_text/ (scores, JSON): it resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from shapes_edit import arguments, measure  # noqa: E402  (the shared seeds / pairing / table)

MODEL = "models/shapes/text"


def texts(split: str, per_length: int) -> list[dict[str, Any]]:
    from genalign.shapes.text import evaluation_texts, split_texts

    lengths = {len(t) for t in split_texts(split)}  # held out: two and three digits
    chosen = evaluation_texts(split, per_length * len(lengths), seed=0)
    return [{"text": t, "group": f"{len(t)} digits"} for t in chosen]


def score(lora: Path | None, rows: list[dict[str, Any]], split: str, eval_seed: int, steps: int) -> list[tuple[float, float]]:
    """(characters, strict) per string, ODE sampling at ``steps``, noise seeded per row."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes.scoring import generate
    from genalign.shapes.text import prompt_for, text_score

    backbone = load_backbone(BackboneConfig(family="flux", path=str(ROOT / MODEL), finetune="none"))
    if lora is not None:
        backbone.load_lora(str(lora))
    images = generate(backbone, [prompt_for(r["text"]) for r in rows], steps, 1.0, eval_seed, batch_size=64)
    scored = [text_score(image, r["text"]) for image, r in zip(images, rows)]
    return [(share, float(ok)) for share, ok in scored]


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__ or "", "configs/shapes_text/diffusion_nft.yaml", "bench/shapes_text", "runs/shapes-text", 60)
    args = parser.parse_args(argv)
    rows = texts(args.split, args.per_group)
    groups = sorted({r["group"] for r in rows})
    measure(args, rows, groups, score, ("characters", "strict"), "shapes_text", "strings")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
