"""The shapes editing task's measured gain: Flow-GRPO (configs/shapes_edit/flow_grpo.yaml) on the
tiny FLUX.1 Kontext model, under several training seeds, each scored against the base on held-out
edits (models/shapes/kontext/edits/heldout.jsonl, the same instructions, source images and noise
seeds for both; training seed s uses evaluation seed s + 1), with the exact evaluator (strict: every
check holds; checks: their share). The gain is the mean over training seeds of each seed's paired
gain, with its standard error over seeds (so it holds training and evaluation noise).

    python bench/shapes_edit.py --seeds 0 1 2            # trains what is missing, then scores
    python bench/shapes_edit.py --seeds 0 1 2 --docs docs # and writes the block in docs/results.md

Runs live under runs/shapes-edit/ (weights) and bench/shapes_edit/ (scores, JSON): it resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/shapes_edit/flow_grpo.yaml"
MODEL = "models/shapes/kontext"


def heldout(per_kind: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (ROOT / MODEL / "edits" / "heldout.jsonl").read_text().splitlines()]
    chosen: list[dict[str, Any]] = []
    for kind in ("recolor", "move", "add"):
        chosen += [r for r in rows if r["kind"] == kind][:per_kind]
    return chosen


def train(seed: int, steps: int, threads: int, runs: Path) -> Path:
    out = runs / f"seed{seed}"
    weights = out / "final" / "pytorch_lora_weights.safetensors"
    if weights.is_file():
        return out
    started = time.time()
    subprocess.run([str(Path(sys.executable).parent / "genalign"), "train", CONFIG, f"run.seed={seed}", f"run.steps={steps}",
                    f"run.output_dir={out}"], cwd=ROOT, check=True,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    print(f"seed {seed}: trained {steps} steps in {(time.time() - started) / 60:.1f} min", flush=True)
    return out


def score(lora: Path | None, rows: list[dict[str, Any]], eval_seed: int, steps: int) -> list[tuple[float, float]]:
    """(share of checks, strict) per held-out edit, ODE sampling at ``steps``, noise seeded per row."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes.editing import edit_score
    from genalign.shapes.scoring import generate

    backbone = load_backbone(BackboneConfig(family="flux-kontext", path=str(ROOT / MODEL), finetune="none",
                                            source_images=str(ROOT / MODEL / "edits" / "heldout.jsonl")))
    if lora is not None:
        backbone.load_lora(str(lora))
    prompts = [r["prompt"] for r in rows]
    images = generate(backbone, prompts, steps, 1.0, eval_seed, batch_size=64)
    out = []
    for image, prompt in zip(images, prompts):
        share, ok = edit_score(image, backbone.source_images[prompt], prompt)
        out.append((share, float(ok)))
    return out


def cached(path: Path, make: Any) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def pooled(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250, help="training steps")
    parser.add_argument("--per-kind", type=int, default=80, help="held-out edits of each kind")
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/shapes_edit")
    parser.add_argument("--runs", default="runs/shapes-edit")
    parser.add_argument("--docs", help="write the results block into DOCS/results.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = heldout(args.per_kind)
    out, runs = ROOT / args.out, ROOT / args.runs
    kinds = [r["kind"] for r in rows]
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        folder = train(seed, args.steps, args.threads, runs)
        tag = f"p{args.per_kind}-n{args.eval_steps}-e{seed + 1}"
        base = cached(out / f"base-{tag}.json", lambda s=seed: score(None, rows, s + 1, args.eval_steps))
        tuned = cached(out / f"seed{seed}-s{args.steps}-{tag}.json",
                       lambda f=folder, s=seed: score(f / "final", rows, s + 1, args.eval_steps))
        export = json.loads((folder / "final" / "export.json").read_text()) if (folder / "final" / "export.json").is_file() else {}
        result: dict[str, Any] = {"cpu_minutes": round(export.get("train_cpu_seconds", 0) / 60, 1)}
        for metric, index in (("strict", 1), ("checks", 0)):
            result[metric] = {"base": sum(b[index] for b in base) / len(base),
                              "tuned": sum(t[index] for t in tuned) / len(tuned)}
            for kind in ("recolor", "move", "add"):
                picked = [i for i, k in enumerate(kinds) if k == kind]
                result[metric][kind] = (sum(base[i][index] for i in picked) / len(picked),
                                        sum(tuned[i][index] for i in picked) / len(picked))
        per_seed[seed] = result
        print(f"seed {seed}: strict {result['strict']['base']:.3f} -> {result['strict']['tuned']:.3f}, "
              f"checks {result['checks']['base']:.3f} -> {result['checks']['tuned']:.3f} "
              f"({result['cpu_minutes']} CPU min)", flush=True)
    summary: dict[str, Any] = {"seeds": args.seeds, "steps": args.steps, "per_kind": args.per_kind,
                               "eval_steps": args.eval_steps, "per_seed": per_seed}
    lines = [f"| metric | base | Flow-GRPO | gain (SE over {len(args.seeds)} seeds) |", "|---|---|---|---|"]
    for metric in ("strict", "checks"):
        base, gain_se = pooled([r[metric]["base"] for r in per_seed.values()]), pooled(
            [r[metric]["tuned"] - r[metric]["base"] for r in per_seed.values()])
        tuned = pooled([r[metric]["tuned"] for r in per_seed.values()])
        summary[metric] = {"base": base[0], "tuned": tuned[0], "gain": gain_se[0], "se": gain_se[1]}
        lines.append(f"| {metric} (all kinds) | {base[0]:.3f} | {tuned[0]:.3f} | {gain_se[0]:+.3f} ({gain_se[1]:.3f}) |")
        for kind in ("recolor", "move", "add"):
            b = pooled([r[metric][kind][0] for r in per_seed.values()])[0]
            t = pooled([r[metric][kind][1] for r in per_seed.values()])[0]
            g = pooled([r[metric][kind][1] - r[metric][kind][0] for r in per_seed.values()])
            lines.append(f"| {metric}, {kind} | {b:.3f} | {t:.3f} | {g[0]:+.3f} ({g[1]:.3f}) |")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    if args.docs:
        from genalign.leaderboard import machine, write_block

        begin, end = "<!-- shapes edit: begin (bench/shapes_edit.py) -->", "<!-- shapes edit: end -->"
        block = begin + "\n" + (f"Measured {time.strftime('%Y-%m-%d')} on {machine()} by `python bench/shapes_edit.py --seeds "
                 f"{' '.join(map(str, args.seeds))}` ({args.steps} training steps a seed, {3 * args.per_kind} held-out "
                 f"edits, ODE {args.eval_steps} steps):\n\n" + "\n".join(lines) + "\n") + end
        write_block(ROOT / args.docs / "results.md", block, begin, end)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
