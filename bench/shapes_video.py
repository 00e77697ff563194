"""The moving-shapes world's measured gain: a method's video config (configs/shapes_video/, DiffusionNFT
by default) on the tiny Wan 2.1 model (models/shapes/video), under several training seeds, each scored
against the base on held-out prompts (a quarter of the motion and colour-change prompts, never trained
on; the same prompts and noise seeds for both; training seed s uses evaluation seed s + 1) with the
exact evaluator (genalign/shapes/video.py: strict, all five checks hold; checks, their share). The gain
is the mean over seeds of each seed's paired gain, with its standard error over seeds.

    python bench/shapes_video.py --seeds 0 1 2             # trains what is missing, then scores
    python bench/shapes_video.py --seeds 0 1 2 --docs docs  # and writes the block in docs/results.md

Runs live under runs/shapes-video/ (weights) and bench/shapes_video/ (scores, JSON): it resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from shapes_edit import arguments, measure  # noqa: E402  (the shared seeds / pairing / table)

MODEL = "models/shapes/video"
GUIDANCE = 3.0  # configs/shapes_video/*.yaml's sample.guidance_scale


def prompts(split: str, per_kind: int) -> list[dict[str, Any]]:
    from genalign.shapes.video import parse_video_prompt, video_evaluation_set

    return [{"prompt": p, "group": parse_video_prompt(p)["kind"]} for p in video_evaluation_set(split, per_kind)]


def score(lora: Path | None, rows: list[dict[str, Any]], split: str, eval_seed: int, steps: int) -> list[tuple[float, float]]:
    """(checks, strict) per prompt, ODE sampling at ``steps``, noise seeded per row."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes.scoring import generate
    from genalign.shapes.video import video_score

    backbone = load_backbone(BackboneConfig(family="wan", path=str(ROOT / MODEL), finetune="none"))
    if lora is not None:
        backbone.load_lora(str(lora))
    videos = generate(backbone, [r["prompt"] for r in rows], steps, GUIDANCE, eval_seed, batch_size=60)
    scored = [video_score(video, r["prompt"]) for video, r in zip(videos, rows)]
    return [(share, float(ok)) for share, ok in scored]


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__ or "", "configs/shapes_video/diffusion_nft.yaml", "bench/shapes_video", "runs/shapes-video",
                       60)
    args = parser.parse_args(argv)
    rows = prompts(args.split, args.per_group)
    measure(args, rows, ("motion", "color_change"), score, ("checks", "strict"), "shapes_video", "prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
