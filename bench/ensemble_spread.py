"""How far an ensemble's members disagree, beside what they agree on: the spread that an
uncertainty-weighted ensemble (UWO, Coste et al. 2024: mean - lambda x the members' variance)
penalises, on the base model's images and on fine-tuned ones.

    python bench/ensemble_spread.py                               # the base shapes flow model
    python bench/ensemble_spread.py --lora RUN/final [RUN2/final]   # and each LoRA's images

Samples ``--per-task`` held-out prompts a task (the config's ``sample`` steps and guidance, at eta 0),
scores every image with each member of the ensemble in ``--config`` (``Ensemble.member_scores``:
standardised by its ``member_stats``, as training scores them) and prints, over the images:
the members' mean, its spread across images, the mean within-image variance (what UWO subtracts,
times lambda), the worst member's distance below the mean (what WCO gives up) and the members'
pairwise correlation across images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def spread(scores: torch.Tensor) -> dict[str, float]:
    """(K, N) standardised member scores, K >= 2 -> the figures this script prints."""
    if scores.dim() != 2 or scores.shape[0] < 2:
        raise ValueError(f"expected (members >= 2, images) scores, got shape {tuple(scores.shape)}")
    mean = scores.mean(0)
    variance = scores.var(0, unbiased=False)
    correlation = torch.corrcoef(scores)
    k = scores.shape[0]
    off_diagonal = correlation[~torch.eye(k, dtype=torch.bool)]
    return {"mean": mean.mean().item(), "mean_sd_across_images": mean.std().item(),
            "within_image_variance": variance.mean().item(), "worst_below_mean": (mean - scores.min(0).values).mean().item(),
            "pairwise_correlation": off_diagonal.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/shapes/adjoint_matching_ensemble.yaml")
    parser.add_argument("--lora", nargs="*", default=[], help="LoRA folders or files on the config's backbone")
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from genalign.core.config import from_dict
    from genalign.core.experiment import BackboneConfig, RewardConfig
    from genalign.pipelines import load_backbone
    from genalign.rewards import load_reward
    from genalign.rewards.combine import Ensemble
    from genalign.shapes.scoring import generate
    from genalign.shapes.world import evaluation_set

    config = yaml.safe_load((ROOT / args.config).read_text())
    ensemble = load_reward(from_dict(RewardConfig, config["reward"], "reward"))
    if not isinstance(ensemble, Ensemble) or not ensemble.member_stats:
        raise SystemExit(f"{args.config}: expected an ensemble reward with member_stats")
    steps = int(config.get("sample", {}).get("num_steps", 10))
    guidance = float(config.get("sample", {}).get("guidance_scale", 2.0))
    prompts = [m["prompt"] for m in evaluation_set("heldout", per_task=args.per_task, seed=args.seed)]
    backbone_config = {k: v for k, v in config["backbone"].items() if k in ("family", "path")}
    lines = ["python bench/ensemble_spread.py " + " ".join(sys.argv[1:]), "",
             f"{len(prompts)} held-out prompts, {steps} steps, guidance {guidance:g}, seed {args.seed}; members "
             f"standardised by {args.config}'s member_stats", "",
             "| images of | members' mean | its spread across images | mean within-image variance | worst below the mean "
             "| members' pairwise correlation |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for lora in [None, *args.lora]:
        started = time.process_time()
        backbone = load_backbone(BackboneConfig(**backbone_config, finetune="none"), "cpu", lora=lora)
        with torch.no_grad():
            images = generate(backbone, prompts, num_steps=steps, guidance_scale=guidance, seed=args.seed)
            standardised = ensemble.member_scores(images.clamp(0, 1), prompts)[0].float().cpu()
        s = spread(standardised)
        lines.append(f"| {lora or 'the base ' + backbone_config['path']} | {s['mean']:+.2f} | "
                     f"{s['mean_sd_across_images']:.2f} | {s['within_image_variance']:.3f} | {s['worst_below_mean']:.2f} | "
                     f"{s['pairwise_correlation']:.2f} |")
        print(lines[-1], f"<!-- {(time.process_time() - started) / 60:.1f} CPU min -->", flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
