"""Sample efficiency on the shapes world: every method trained for the same budget, a wall-clock
time or a number of reward queries, then scored by the exact evaluator on held-out prompts, in one
table (TRL's DDPO alongside).

Each method runs its shipped config (``configs/shapes/<method>.yaml``), one after the other, then
``genalign eval shapes`` on its LoRA; the table gives the steps done, the reward queries they made
(images scored by the training reward, from the config's batch shape, warm-up steps included) and
the gold score. ``--minutes``: ``run.max_minutes`` (an otherwise idle machine); ``--queries``: the
steps that make that many queries (rounded up to whole steps; the machine's load does not matter).
TRL's DDPO (``bench/trl_ddpo.py``, its own environment, 16 queries an epoch) runs with the same
budget. The base models' scores come from the same evaluation without a LoRA.

    .venv/bin/python bench/sample_efficiency.py --minutes 5                 # every method + TRL
    .venv/bin/python bench/sample_efficiency.py --queries 800
    .venv/bin/python bench/sample_efficiency.py --minutes 2 --methods ddpo d3po --per-task 20

The rewards differ by config: the online preference methods, Adjoint Matching and AC-Flow train
on the CLIP proxy (``models/shapes/clip``), DDPO / Flow-GRPO / VARD on the exact evaluator
(``shapes_gold``, the gold score itself), as shipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

from genalign.leaderboard import queries_per_step

ROOT = Path(__file__).resolve().parents[1]
FAMILY = {"sd": "models/shapes/sd", "sd3": "models/shapes/sd3"}
METHODS = ("diffusion_dpo", "inversion_dpo", "d3po", "ddpo", "vard", "adjoint_matching", "flow_grpo", "ac_flow")


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")


def evaluate(family: str, lora: Path | None, out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "genalign", "eval", "shapes", "--backbone", FAMILY[family], "--family", family,
               "--clip", "models/shapes/clip", "--per-task", str(args.per_task), "--out", str(out)]
    if lora is not None:
        command += ["--lora", str(lora)]
    run(command, out.parent / f"{out.name}.log")
    return json.loads((out / "scores.json").read_text())["gold"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=5.0, help="training budget per method (wall clock)")
    budget.add_argument("--queries", type=int, default=0, help="training budget per method (reward queries)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-trl", action="store_true", help="leave TRL's DDPO out")
    parser.add_argument("--trl-venv", default=str(ROOT / "bench" / ".venv-trl"))
    parser.add_argument("--per-task", type=int, default=50, help="held-out prompts per GenEval task")
    parser.add_argument("--out", default="runs/sample-efficiency")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for family in sorted({yaml.safe_load((ROOT / f"configs/shapes/{m}.yaml").read_text())["backbone"]["family"]
                          for m in args.methods} | ({"sd"} if not args.no_trl else set())):
        rows[f"base {family}"] = {"gold": evaluate(family, None, out / f"base-{family}", args), "steps": 0,
                                  "queries": 0, "reward": "-"}
        print(f"base {family}: gold {rows[f'base {family}']['gold']['overall']:.3f}", flush=True)
    for method in args.methods:
        config_path = ROOT / f"configs/shapes/{method}.yaml"
        config = yaml.safe_load(config_path.read_text())
        folder = out / method
        limit = (f"run.steps={math.ceil(args.queries / queries_per_step(config))}" if args.queries
                 else f"run.max_minutes={args.minutes}")
        run([sys.executable, "-m", "genalign", "train", str(config_path), f"run.output_dir={folder}", limit,
             "run.checkpoint_every=0"], out / f"{method}.train.log")
        steps = len((folder / "metrics.jsonl").read_text().splitlines())
        family = config["backbone"]["family"]
        gold = evaluate(family, folder / "final" / "pytorch_lora_weights.safetensors", folder / "eval", args)
        rows[method] = {"gold": gold, "steps": steps, "queries": steps * queries_per_step(config),
                        "reward": config.get("reward", {}).get("name", "-"), "family": family}
        print(f"{method}: {steps} steps, gold {gold['overall']:.3f}", flush=True)
    if not args.no_trl:
        folder = out / "trl_ddpo"
        limit = (["--epochs", str(math.ceil(args.queries / 16))] if args.queries
                 else ["--epochs", "100000", "--max-minutes", str(args.minutes)])
        run([sys.executable, "bench/trl_ddpo.py", "train", "--venv", args.trl_venv, *limit, "--train-out", str(folder)],
            out / "trl_ddpo.train.log")
        epochs = json.loads((folder / "epochs.json").read_text())
        gold = evaluate("sd", folder / "final" / "pytorch_lora_weights.safetensors", folder / "eval", args)
        rows["TRL 0.23.1 ddpo"] = {"gold": gold, "steps": 2 * len(epochs), "queries": epochs[-1]["queries"],
                                   "reward": "shapes_gold", "family": "sd"}
        print(f"TRL ddpo: {len(epochs)} epochs, gold {gold['overall']:.3f}", flush=True)
    budget = f"{args.queries} reward queries" if args.queries else f"{args.minutes:g} minutes"
    print(f"\n{budget} of training each (CPU), gold overall on {args.per_task} held-out prompts a task:")
    print("| method | backbone | training reward | steps | reward queries | gold overall |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row.get('family', name.split()[-1])} | {row['reward']} | {row['steps']} | "
              f"{row['queries']:.0f} | {row['gold']['overall']:.3f} |")
    (out / "sample_efficiency.json").write_text(json.dumps({"minutes": None if args.queries else args.minutes,
                                                            "queries": args.queries or None, "per_task": args.per_task,
                                                            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
