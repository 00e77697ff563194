"""How much of the exact evaluator's order the CLIP proxy passes on to a method that learns from
pairs, or from a sample's rank among its prompt's other samples.

    python bench/proxy_pairs.py                 # the table for docs/results.md
    python bench/proxy_pairs.py --per-task 50   # more prompts, smaller standard errors

Diffusion-DPO, Inversion-DPO and D3PO learn from which of two of the policy's own samples of one
prompt the proxy prefers; AC-Flow (``shaping: prompt``) and GRPO from a sample's reward relative to
its prompt's other samples. For each way the shipped shapes configs sample their pairs (SD at eta 0
from independent noise: the DPOs; SD at eta 1 from one initial noise a prompt: D3PO; SD3 at eta 0:
AC-Flow), the base model draws 4 images of each of ``--per-task`` training prompts a task (10
steps, guidance 2, the configs' settings), and ``genalign.shapes.scoring.pair_agreement`` says of
every pair of one prompt: whether the gold tells them apart (``decided``), whether the proxy orders
them as the gold does (``agree``, 0.5: a coin) and the net share of pairs that carry the gold's
order (``signal``). Gold: the strict verdict (what the leaderboard scores) and the share of clauses
(the ``shapes_gold`` reward). Base models only: the pairs a run starts from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SETTINGS = {  # name: (family, path, eta, shared noise, what samples its pairs this way)
    "sd, eta 0": ("sd", "models/shapes/sd", 0.0, False, "Diffusion-DPO, Inversion-DPO"),
    "sd, eta 1, one noise a prompt": ("sd", "models/shapes/sd", 1.0, True, "D3PO"),
    "sd3, eta 0": ("sd3", "models/shapes/sd3", 0.0, False, "AC-Flow (and the proxy-trained Adjoint Matching)"),
}


def cell(stats: dict[str, float], key: str) -> str:
    return f"{stats[key]:.2f} ({stats[key + '_se']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-task", type=int, default=25)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clip", default="models/shapes/clip")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes.scoring import proxy_pairs

    everything = {}
    print(f"{args.samples} samples of each of {args.per_task} training prompts a task, 10 steps, guidance 2, seed "
          f"{args.seed}, {args.threads} thread(s); gold: strict verdict | share of clauses; mean (standard error over "
          "prompts)\n")
    print("| pairs sampled as | their method | task | base gold | decided (strict) | agree (strict) | signal (strict) "
          "| decided (share) | agree (share) | signal (share) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (family, path, eta, shared, methods) in SETTINGS.items():
        started = time.process_time()
        backbone = load_backbone(BackboneConfig(family=family, path=path, finetune="none"))
        result = proxy_pairs(backbone, args.clip, "train", args.per_task, args.samples, 10, 2.0, eta, shared, args.seed)
        everything[name] = result
        for task, r in result.items():
            print(f"| {name} | {methods} | {task} | {r['gold']:.2f} | {cell(r['strict'], 'decided')} | "
                  f"{cell(r['strict'], 'agree')} | {cell(r['strict'], 'signal')} | {cell(r['share'], 'decided')} | "
                  f"{cell(r['share'], 'agree')} | {cell(r['share'], 'signal')} |", flush=True)
        print(f"<!-- {name}: {(time.process_time() - started) / 60:.1f} CPU min -->", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1) + "\n")


if __name__ == "__main__":
    main()
