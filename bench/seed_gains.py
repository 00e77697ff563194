"""Is a shapes-world method's gain real? Train its shipped config under several run seeds and
evaluate each LoRA against the base over the same held-out prompts and seeds at several eval seeds
(``genalign eval shapes --with-base``: the gain paired per image, with its standard error), then pool:
each run's gains are averaged over the eval seeds, and the mean over runs is reported with a
standard error that pools the runs' spread (training noise) with the evaluation's (the per-image
spread of the runs' mean difference; every run is compared with the same base images, whose noise
the runs' spread cannot show): ``genalign.shapes.scoring.pooled_paired_gain``.

    .venv/bin/python bench/seed_gains.py configs/shapes/vard.yaml --seeds 0 1 2 3   # ~75 min on 2 cores
    .venv/bin/python bench/seed_gains.py configs/shapes/vard.yaml --seeds 0 --steps 2 --per-task 2  # a smoke run

It calls the CLI as a user would; outputs land in ``--out`` (default runs/seed-gains/<config name>/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genalign.shapes.scoring import pooled_paired_gain  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a shapes config (its backbone is evaluated with and without the LoRA)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="run.seed values")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--per-task", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="override run.steps (for a smoke run)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="evaluate at this guidance scale (default: genalign eval shapes' 2.0); results land in eval-seedN-gG/")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or ROOT / "runs" / "seed-gains" / Path(args.config).stem)
    cli = [sys.executable, "-m", "genalign"]
    import yaml

    backbone = yaml.safe_load((ROOT / args.config).read_text())["backbone"]
    model = ["--backbone", backbone["path"], "--family", backbone.get("family", "sd")]
    differences: dict[int, list[float]] = {}
    seen: dict[int, tuple[list[bool], list[str]]] = {}  # eval seed -> the base's verdicts and tags: every run must
    # pair with the same images
    for seed in args.seeds:
        run = out / f"seed{seed}"
        overrides = [f"run.seed={seed}", f"run.output_dir={run}"]
        if args.steps is not None:
            overrides.append(f"run.steps={args.steps}")
        lora = run / "final" / "pytorch_lora_weights.safetensors"
        timing = run / "train_minutes.txt"
        if not (lora.is_file() and timing.is_file()):  # a finished run is reused (the bench resumes)
            start = time.perf_counter()
            subprocess.run([*cli, "train", args.config, *overrides], check=True, cwd=ROOT)
            timing.write_text(f"{(time.perf_counter() - start) / 60:.2f}\n")
        minutes = float(timing.read_text())
        differences[seed] = []
        for eval_seed in args.eval_seeds:
            where = run / (f"eval-seed{eval_seed}" if args.guidance_scale is None
                           else f"eval-seed{eval_seed}-g{args.guidance_scale:g}")
            guidance = [] if args.guidance_scale is None else ["--guidance-scale", str(args.guidance_scale)]
            if not (where / "scores.json").is_file():
                subprocess.run([*cli, "eval", "shapes", *model, "--lora", str(lora), "--with-base",
                                "--per-task", str(args.per_task), "--seed", str(eval_seed), *guidance, "--out", str(where)],
                               check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            result = json.loads((where / "scores.json").read_text())
            images = (result["base"]["verdicts"], result["tags"])
            if seen.setdefault(eval_seed, images) != images:
                raise SystemExit(f"{where}: the base's verdicts or the prompts differ from the first run's at eval seed "
                                 f"{eval_seed} (another model, prompt set or evaluator): its runs cannot be pooled")
            differences[seed] += [float(t) - float(b) for b, t in zip(result["base"]["verdicts"], result["verdicts"])]
            print(f"run.seed {seed} ({minutes:.1f} min), eval seed {eval_seed}: base {result['base']['gold']['overall']:.3f}, "
                  f"gain {result['gain']['gain']:+.3f} (standard error {result['gain']['standard_error']:.3f})", flush=True)
    tags = [tag for eval_seed in args.eval_seeds for tag in seen[eval_seed][1]]  # every run's images, in its order
    pooled = pooled_paired_gain(list(differences.values()), tags)
    print(f"{Path(args.config).name}: paired gold gain {pooled['gain']:+.3f}, standard error {pooled['standard_error']:.3f} "
          f"over {len(differences)} runs (runs' spread {pooled['seeds_error']:.3f}, evaluation's {pooled['images_error']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
