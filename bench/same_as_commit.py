"""Does a refactor change behaviour? Run the same short jobs at an earlier commit and at the working
tree and compare their outputs bit for bit.

For every shipped shapes config: 2 training steps, then the exported LoRA and ``metrics.jsonl``;
then ``genalign eval shapes`` (base and a LoRA, proxy, diversity), ``genalign reno`` (3 reward
evaluations) and ``genalign sample`` (stochastic, several images a prompt). The earlier commit
runs from a temporary ``git worktree`` with the same virtual environment. One job at a time.

    .venv/bin/python bench/same_as_commit.py 4b8d0f5                 # everything (~6 min on 2 cores)
    .venv/bin/python bench/same_as_commit.py HEAD~3 --methods ddpo vard --no-tools

Prints one line a job (identical or not); exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ddpo", "d3po", "diffusion_dpo", "inversion_dpo", "vard", "flow_grpo", "ac_flow", "adjoint_matching")


def run(tree: Path, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "genalign", *args], cwd=tree, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed in {tree}; see {log}")


def same_files(a: Path, b: Path, names: list[str]) -> bool:
    """Byte-identical files; safetensors files by their tensors (their headers may order them differently)."""
    from safetensors.torch import load_file

    for name in names:
        if name.endswith(".safetensors"):
            x, y = load_file(str(a / name)), load_file(str(b / name))
            if x.keys() != y.keys() or not all(x[k].dtype == y[k].dtype and bool((x[k] == y[k]).all()) for k in x):
                return False
        elif (a / name).read_bytes() != (b / name).read_bytes():
            return False
    return True


def same_metrics(a: Path, b: Path) -> tuple[bool, list[str]]:
    """metrics.jsonl of both runs equal on the keys they share (and as many lines), and the keys only
    the newer run logs."""
    rows_a = [json.loads(line) for line in a.read_text().splitlines()]
    rows_b = [json.loads(line) for line in b.read_text().splitlines()]
    added = sorted({k for row in rows_b for k in row} - {k for row in rows_a for k in row})
    same = len(rows_a) == len(rows_b) and all(
        all(x[k] == y[k] for k in x if k in y) and set(x) <= set(y) for x, y in zip(rows_a, rows_b))
    return same, added


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the earlier commit")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-tools", action="store_true", help="skip eval shapes, reno and sample")
    parser.add_argument("--out", default=None, help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="same-as-commit-"))
    out.mkdir(parents=True, exist_ok=True)
    old = out / "tree"
    if not old.exists():
        subprocess.run(["git", "worktree", "add", "-f", "-q", "--detach", str(old), args.rev], cwd=ROOT, check=True)
    trees = {"old": old, "new": ROOT}
    differ = 0

    def report(name: str, same: bool) -> None:
        nonlocal differ
        differ += not same
        print(f"{'identical' if same else 'DIFFERENT':<10} {name}", flush=True)

    for method in args.methods:
        for side, tree in trees.items():
            run_dir = out / f"{method}-{side}"
            run(tree, ["train", f"configs/shapes/{method}.yaml", "run.steps=2", f"run.output_dir={run_dir}",
                       "run.sample_every=0", "run.checkpoint_every=0"], out / f"{method}-{side}.log")
        a, b = out / f"{method}-old", out / f"{method}-new"
        same, added = same_metrics(a / "metrics.jsonl", b / "metrics.jsonl")
        report(method + (f" (metrics added: {', '.join(added)})" if added else ""),
               same and same_files(a, b, ["final/pytorch_lora_weights.safetensors"]))
    if args.no_tools:
        return int(differ > 0)
    lora = out / f"{args.methods[0]}-new" / "final" / "pytorch_lora_weights.safetensors"
    for side, tree in trees.items():
        run(tree, ["eval", "shapes", "--per-task", "5", "--lora", str(lora), "--with-base", "--clip", "models/shapes/clip",
                   "--diversity", "2", "--out", str(out / f"eval-{side}"), "--device", "cpu"], out / f"eval-{side}.log")
        run(tree, ["reno", "--backbone", "models/shapes/sd", "--reward", "clip", "--reward-path", "models/shapes/clip",
                   "--shapes-heldout", "1", "--iterations", "3", "--steps", "2", "--guidance-scale", "2",
                   "--out", str(out / f"reno-{side}"), "--device", "cpu"], out / f"reno-{side}.log")
        run(tree, ["sample", "--backbone", "models/shapes/sd", "--prompt", "a red circle", "--prompt", "two blue squares",
                   "--images-per-prompt", "2", "--eta", "1.0", "--steps", "5", "--out", str(out / f"sample-{side}"),
                   "--device", "cpu"], out / f"sample-{side}.log")
    scores = [json.loads((out / f"eval-{side}" / "scores.json").read_text()) for side in trees]
    for s in scores:
        s.pop("diversity_k", None)  # a key newer reports add
    report("eval shapes", scores[0] == scores[1] and same_files(out / "eval-old", out / "eval-new", ["grid.png"]))
    report("reno", same_files(out / "reno-old", out / "reno-new", ["reno.json", "noise.safetensors"]))
    report("sample", same_files(out / "sample-old", out / "sample-new",
                                ["0000.png", "0001.png", "0002.png", "0003.png", "prompts.tsv"]))
    print(f"outputs in {out} (remove the worktree with: git worktree remove --force {old})")
    return int(differ > 0)


if __name__ == "__main__":
    raise SystemExit(main())
