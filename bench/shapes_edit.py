"""The shapes editing task's measured gain: a method's editing config (configs/shapes_edit/, Flow-GRPO
by default) on the tiny FLUX.1 Kontext model, under several training seeds, each scored against the
base on held-out edits (models/shapes/kontext/edits/heldout.jsonl, the same instructions, source
images and noise seeds for both; training seed s uses evaluation seed s + 1), with the exact
evaluator (strict: every check holds; checks: their share). The gain is the mean over training seeds
of each seed's paired gain, with its standard error over seeds (so it holds training and evaluation
noise). Choose settings with ``--split train`` (the edits trained on), report ``--split heldout``.

    python bench/shapes_edit.py --seeds 0 1 2            # trains what is missing, then scores
    python bench/shapes_edit.py --seeds 0 1 2 --docs docs # and writes the block in docs/results.md
    python bench/shapes_edit.py --config configs/shapes_edit/diffusion_nft.yaml      # another method
    python bench/shapes_edit.py --config configs/shapes_edit/diffusion_nft.yaml --set run.lr=1e-3 \
        --runs runs/shapes-edit-nft-lr1 --out bench/shapes_edit_nft_lr1 --split train  # a setting, on train

Runs live under runs/shapes-edit/ (weights) and bench/shapes_edit/ (scores, JSON): it resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "models/shapes/kontext"
METHODS = {"flow_grpo": "Flow-GRPO", "diffusion_nft": "DiffusionNFT"}


def edits(split: str, per_kind: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (ROOT / MODEL / "edits" / f"{split}.jsonl").read_text().splitlines()]
    chosen: list[dict[str, Any]] = []
    for kind in ("recolor", "move", "add"):
        chosen += [r for r in rows if r["kind"] == kind][:per_kind]
    return chosen


def train(config: str, overrides: list[str], seed: int, steps: int | None, threads: int, runs: Path) -> Path:
    out = runs / f"seed{seed}"
    weights = out / "final" / "pytorch_lora_weights.safetensors"
    if weights.is_file():
        return out
    started = time.time()
    steps_override = [f"run.steps={steps}"] if steps is not None else []
    subprocess.run([str(Path(sys.executable).parent / "genalign"), "train", config, *overrides, f"run.seed={seed}",
                    *steps_override, f"run.output_dir={out}"], cwd=ROOT, check=True,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    print(f"seed {seed}: trained in {(time.time() - started) / 60:.1f} min", flush=True)
    return out


def score(lora: Path | None, rows: list[dict[str, Any]], split: str, eval_seed: int, steps: int) -> list[tuple[float, float]]:
    """(share of checks, strict) per held-out edit, ODE sampling at ``steps``, noise seeded per row."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes.editing import edit_score
    from genalign.shapes.scoring import generate

    backbone = load_backbone(BackboneConfig(family="flux-kontext", path=str(ROOT / MODEL), finetune="none",
                                            source_images=str(ROOT / MODEL / "edits" / f"{split}.jsonl")))
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


def arguments(description: str, config: str, out: str, runs: str, per_group: int) -> argparse.ArgumentParser:
    """The options both shapes-task benches take (this one and bench/shapes_text.py). Each config trains
    into its own folders (``--runs`` / ``--out`` default to ``runs`` / ``out`` for the default config,
    suffixed with the config's name otherwise); runs with ``--set`` need folders of their own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=config, help="the method's config")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for training")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="what is scored: choose settings on train, report heldout")
    parser.add_argument("--per-group", "--per-kind", dest="per_group", type=int, default=per_group,
                        help="scored items of each group (edit kind, text length)")
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help=f"scores (JSON); default {out}, or {out}_<config name> for another config")
    parser.add_argument("--runs", help=f"weights; default {runs}, or {runs}-<config name> for another config")
    parser.set_defaults(default_config=config, default_out=out, default_runs=runs, default_per_group=per_group)
    parser.add_argument("--docs", help="write the results block into DOCS/results.md")
    return parser


def measure(args: argparse.Namespace, rows: list[dict[str, Any]], groups: Sequence[str],
            score_rows: Callable[[Path | None, list[dict[str, Any]], str, int, int], list[tuple[float, float]]],
            metrics: tuple[str, str], bench: str, what: str) -> dict[str, Any]:
    """Train each seed (resuming), score base and tuned on the same ``rows`` (each with its ``group``)
    and seeds, print the table; ``metrics`` names the share and the strict verdict. With ``--docs``,
    the block in docs/results.md (``<!-- {bench} ...: begin -->``)."""
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    config = yaml.safe_load((ROOT / args.config).read_text())
    method, trained_steps = config["method"]["name"], args.steps or config["run"]["steps"]
    label = METHODS.get(method, method)
    stem = "" if args.config == args.default_config else Path(args.config).stem
    default_out = f"{args.default_out}_{stem}" if stem else args.default_out
    default_runs = f"{args.default_runs}-{stem}" if stem else args.default_runs
    args.out, args.runs = args.out or default_out, args.runs or default_runs
    out, runs = ROOT / args.out, ROOT / args.runs
    kinds = [r["group"] for r in rows]
    per_seed: dict[int, dict[str, Any]] = {}
    share_name, strict_name = metrics
    for seed in args.seeds:
        folder = train(args.config, args.set, seed, args.steps, args.threads, runs)
        tag = ("" if args.split == "heldout" else "train-") + f"p{args.per_group}-n{args.eval_steps}-e{seed + 1}"
        base = cached(out / f"base-{tag}.json", lambda s=seed: score_rows(None, rows, args.split, s + 1, args.eval_steps))
        steps = f"-s{args.steps}" if args.steps is not None else ""
        tuned = cached(out / f"seed{seed}{steps}-{tag}.json",
                       lambda f=folder, s=seed: score_rows(f / "final", rows, args.split, s + 1, args.eval_steps))
        export = json.loads((folder / "final" / "export.json").read_text()) if (folder / "final" / "export.json").is_file() else {}
        result: dict[str, Any] = {"cpu_minutes": round(export.get("train_cpu_seconds", 0) / 60, 1)}
        for metric, index in ((strict_name, 1), (share_name, 0)):
            result[metric] = {"base": sum(b[index] for b in base) / len(base),
                              "tuned": sum(t[index] for t in tuned) / len(tuned)}
            for kind in groups:
                picked = [i for i, k in enumerate(kinds) if k == kind]
                result[metric][kind] = (sum(base[i][index] for i in picked) / len(picked),
                                        sum(tuned[i][index] for i in picked) / len(picked))
        per_seed[seed] = result
        print(f"seed {seed}: {strict_name} {result[strict_name]['base']:.3f} -> {result[strict_name]['tuned']:.3f}, "
              f"{share_name} {result[share_name]['base']:.3f} -> {result[share_name]['tuned']:.3f} "
              f"({result['cpu_minutes']} CPU min)", flush=True)
    summary: dict[str, Any] = {"config": args.config, "set": args.set, "split": args.split, "seeds": args.seeds,
                               "steps": args.steps, "per_group": args.per_group, "eval_steps": args.eval_steps,
                               "per_seed": per_seed}
    lines = [f"| metric | base | {label} | gain (SE over {len(args.seeds)} seeds) |", "|---|---|---|---|"]
    for metric in (strict_name, share_name):
        base, gain_se = pooled([r[metric]["base"] for r in per_seed.values()]), pooled(
            [r[metric]["tuned"] - r[metric]["base"] for r in per_seed.values()])
        tuned = pooled([r[metric]["tuned"] for r in per_seed.values()])
        summary[metric] = {"base": base[0], "tuned": tuned[0], "gain": gain_se[0], "se": gain_se[1]}
        lines.append(f"| {metric} (all) | {base[0]:.3f} | {tuned[0]:.3f} | {gain_se[0]:+.3f} ({gain_se[1]:.3f}) |")
        for kind in groups:
            b = pooled([r[metric][kind][0] for r in per_seed.values()])[0]
            t = pooled([r[metric][kind][1] for r in per_seed.values()])[0]
            g = pooled([r[metric][kind][1] - r[metric][kind][0] for r in per_seed.values()])
            lines.append(f"| {metric}, {kind} | {b:.3f} | {t:.3f} | {g[0]:+.3f} ({g[1]:.3f}) |")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"summary{'' if args.split == 'heldout' else '-train'}.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    if args.docs:
        from genalign.leaderboard import machine, write_block

        script = f"bench/{bench}.py"
        name = "" if (bench, method) == ("shapes_edit", "flow_grpo") else f" {method}"
        tag = bench.replace("_", " ")
        begin, end = f"<!-- {tag}{name}: begin ({script}) -->", f"<!-- {tag}{name}: end -->"
        command = " ".join([f"python {script}", *(["--config", args.config] if stem else []),
                            *(["--set", *args.set] if args.set else []),
                            *(["--steps", str(args.steps)] if args.steps is not None else []),
                            *(["--runs", args.runs] if args.runs != default_runs else []),
                            *(["--out", args.out] if args.out != default_out else []),
                            *(["--per-group", str(args.per_group)] if args.per_group != args.default_per_group else []),
                            *(["--split", args.split] if args.split != "heldout" else []),
                            "--seeds", *map(str, args.seeds)])
        block = begin + "\n" + (f"Measured {time.strftime('%Y-%m-%d')} on {machine()} by `{command}` ({trained_steps} "
                 f"training steps a seed, {len(rows)} {args.split} {what}, ODE {args.eval_steps} steps):\n\n"
                 + "\n".join(lines) + "\n") + end
        write_block(ROOT / args.docs / "results.md", block, begin, end)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__ or "", "configs/shapes_edit/flow_grpo.yaml", "bench/shapes_edit", "runs/shapes-edit", 80)
    args = parser.parse_args(argv)
    rows = [{**r, "group": r["kind"]} for r in edits(args.split, args.per_group)]
    measure(args, rows, ("recolor", "move", "add"), score, ("checks", "strict"), "shapes_edit", "edits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
