"""What a run reports: ``metrics.jsonl`` (one JSON line an optimizer step, trimmed to the resumed
step when a run resumes), the progress bar's fields, and the flat config trackers get."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

REWARD_METRICS = ("reward_mean", "reward", "reward_w")  # what methods call their batch's reward, in preference


class MetricsLog:
    """``metrics.jsonl`` of a run, written by the main process only (``active``)."""

    def __init__(self, path: Path, active: bool):
        self.path, self.active = path, active

    def start(self, resumed_at: int | None) -> None:
        """A fresh run (``resumed_at`` None) starts a fresh log; a resumed one drops the lines of
        the steps it will redo."""
        if not self.active:
            return
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, entry: dict[str, float]) -> None:
        if self.active:
            with open(self.path, "a") as log:
                log.write(json.dumps(entry) + "\n")


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows of a step's metrics: the loss and the batch reward when the
    method reports one."""
    fields = {"loss": f"{metrics['loss']:.4g}"}
    reward = next((metrics[k] for k in REWARD_METRICS if k in metrics), None)
    if reward is not None:
        fields["reward"] = f"{reward:.4g}"
    return fields


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b": value}`` with plain values (what trackers take)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    value = data if isinstance(data, (int, float, str, bool)) else str(data)
    return {prefix.rstrip("."): value}


def scalar(value: Any) -> float:
    """A metric as one float (the mean of a tensor)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)
