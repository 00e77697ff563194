"""What a method's training logged, by quarter of its run, for each training seed: the figures that
say what limits a method (is the training reward climbing? is the preference learned? is the value
model right?), read from the leaderboard's runs.

    python bench/training_signals.py inversion_dpo implicit_accuracy loss reward_mean
    python bench/training_signals.py vard value_error_new kl reward_mean --runs runs/leaderboard/runs

Each cell is the mean of a key over a quarter of the run's steps (``metrics.jsonl``, one line a
step) with the standard error of that mean, treating the steps as independent (a step's samples
are new; the model moves slowly, so read a trend across quarters, not a single cell). The last row
of each key pools the seeds: the mean of the seeds' quarter means, with the seeds' spread for its
standard error.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path


def quarters(values: Sequence[float], parts: int = 4) -> list[tuple[float, float, int]]:
    """``values`` in ``parts`` consecutive pieces as equal as can be (the first ones one longer where
    they do not divide): each piece's mean, the standard error of that mean (std with ddof 1 over
    sqrt n; nan for a piece of one) and its length."""
    if len(values) < parts:
        raise ValueError(f"{len(values)} values cannot make {parts} parts")
    size, extra = divmod(len(values), parts)
    out, start = [], 0
    for i in range(parts):
        piece = values[start:start + size + (i < extra)]
        start += len(piece)
        mean = sum(piece) / len(piece)
        spread = math.sqrt(sum((v - mean) ** 2 for v in piece) / (len(piece) - 1)) if len(piece) > 1 else math.nan
        out.append((mean, spread / math.sqrt(len(piece)), len(piece)))
    return out


def read_metrics(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(method: str, keys: Sequence[str], runs: Path, parts: int = 4) -> list[str]:
    """A markdown table: a row per key and seed, a column per part, then the seeds pooled."""
    folders = sorted(p for p in (runs / method).glob("seed*") if (p / "metrics.jsonl").is_file())
    if not folders:
        raise SystemExit(f"no {runs / method}/seed*/metrics.jsonl: train it first (bench/leaderboard.py)")
    logs = {f.name: read_metrics(f / "metrics.jsonl") for f in folders}
    head = ["key", "seed", *(f"part {i + 1} of {parts}" for i in range(parts))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        per_seed = []
        for seed, log in logs.items():
            values = [float(row[key]) for row in log if key in row and row[key] is not None]
            if len(values) < parts:
                lines.append(f"| {key} | {seed} | " + " | ".join(["-"] * parts) + " |")
                continue
            q = quarters(values, parts)
            per_seed.append([m for m, _, _ in q])
            lines.append(f"| {key} | {seed} | " + " | ".join(f"{m:.4g} ({e:.2g})" for m, e, _ in q) + " |")
        if len(per_seed) > 1:
            cells = []
            for i in range(parts):
                mean, error, _ = quarters([row[i] for row in per_seed], 1)[0]  # the seeds as one piece
                cells.append(f"{mean:.4g} ({error:.2g})")
            lines.append(f"| {key} | {len(per_seed)} seeds | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", help="a leaderboard config's name, e.g. inversion_dpo")
    parser.add_argument("keys", nargs="+", help="metrics.jsonl keys, e.g. implicit_accuracy reward_mean")
    parser.add_argument("--runs", default="runs/leaderboard/runs", help="the leaderboard's runs folder")
    parser.add_argument("--parts", type=int, default=4, help="pieces of the run (default: quarters)")
    args = parser.parse_args()
    print("\n".join(table(args.method, args.keys, Path(args.runs), args.parts)))


if __name__ == "__main__":
    main()
