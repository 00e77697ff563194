"""Checkpoints of a training run: folders ``checkpoints/step-000100`` written under a temporary
name and renamed when complete (a ``COMPLETE`` marker); a folder without it is never resumed from.

A checkpoint holds everything an exact resume needs: the trainable weights (full tensors, gathered
from FSDP shards), optimizer, LR scheduler, EMA, GradScaler, the method's shared state
(``finetuner.pt``) and each process's own (``finetuner-rank-N.pt``), the counters, and per process
the data position and every RNG. Every process takes part in writing it; an error on any process
is raised on all of them (none is left waiting at a barrier).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from genalign.core.accelerator import any_process
from genalign.core.loading import load_torch_file
from genalign.core.sharding import gather_full, local_part, shard_like, shard_optimizer_state
from genalign.core.types import FineTuner

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "COMPLETE"


class NonFiniteError(RuntimeError):
    """The loss, a metric or the gradient norm became NaN/inf too many steps in a row."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


@dataclass
class TrainingState:
    """What a checkpoint saves and restores (references to the trainer's objects)."""

    named_params: dict[str, torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    finetuner: FineTuner
    source: Any  # the data source: ``state_dict()`` / ``load_state_dict``
    sharded: bool
    counters: Callable[[], dict[str, Any]]


class Checkpoints:
    """The checkpoint folders under ``root``; keeps the newest ``keep``."""

    def __init__(self, root: Path, accelerator: Any, keep: int):
        self.root, self.accelerator, self.keep = root, accelerator, keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).is_file()]
        return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    def find(self, checkpoint: str | Path) -> Path | None:
        """``latest`` (None when there is none yet) or the folder given."""
        if str(checkpoint) == "latest":
            found = self.complete()
            return found[-1] if found else None
        return Path(checkpoint)

    def save(self, step: int, state: TrainingState) -> Path:
        acc = self.accelerator
        final = self.root / f"{CHECKPOINT_PREFIX}{step:06d}"
        tmp = self.root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
        # Every process checks its part (FSDP: its shards), so that all raise together.
        bad = [name for name, param in state.named_params.items() if not torch.isfinite(local_part(param)).all()]
        if any_process(acc, bool(bad)):
            where = f"parameter {bad[0]}" if bad else "a parameter on another process"
            raise NonFiniteError(f"step {step}: {where} is not finite; refusing to checkpoint")
        shared = self._shared_state(state)
        acc.wait_for_everyone()
        try:
            self._write(tmp, state, shared)
        except OSError as err:  # disk full, quota, permissions: keep what was there
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.complete()
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not write checkpoint {final} ({err}); {kept}") from err
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _shared_state(self, state: TrainingState) -> dict[str, Any] | None:
        """What the main process writes, as full tensors; every process takes part in gathering
        sharded state (FSDP) and only the main one keeps it (None elsewhere)."""
        keep = self.accelerator.is_main_process
        if not (keep or state.sharded):
            return None  # nothing to gather, nothing to write
        finetuner_state = state.finetuner.state_dict()
        shared = {
            "weights": gather_full(state.named_params, keep),
            "optimizer": gather_full(state.optimizer.state_dict(), keep),
            "ema": gather_full(state.ema.state_dict(), keep) if state.ema is not None else None,
            "finetuner": gather_full(finetuner_state, keep) if finetuner_state is not None else None,
        }
        return shared if keep else None

    def _write(self, tmp: Path, state: TrainingState, shared: dict[str, Any] | None) -> None:
        acc = self.accelerator
        error: OSError | None = None
        if acc.is_main_process:
            try:
                self._write_shared(tmp, state, shared)  # type: ignore[arg-type]
            except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
                error = err if isinstance(err, OSError) else OSError(str(err).splitlines()[0])
        if any_process(acc, error is not None):
            raise error or OSError("the main process could not write the checkpoint")
        try:
            rank = acc.process_index
            (tmp / f"rank-{rank}.json").write_text(json.dumps({**host_rng_state(), "data": state.source.state_dict()}))
            process_state = state.finetuner.process_state_dict()
            if process_state is not None:  # this process's own samples: a rollout, a replay buffer
                torch.save(process_state, tmp / f"finetuner-rank-{rank}.pt")
            save_file(torch_rng_state(), str(tmp / f"rng-{rank}.safetensors"))
        except (OSError, RuntimeError) as err:
            error = err if isinstance(err, OSError) else OSError(str(err).splitlines()[0])
        if any_process(acc, error is not None):
            raise error or OSError("another process could not write its part of the checkpoint")

    def _write_shared(self, tmp: Path, state: TrainingState, shared: dict[str, Any]) -> None:
        """The main process's part: weights, optimizer, scheduler, EMA, scaler, method state, counters."""
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().float().cpu().contiguous() for n, p in shared["weights"].items()},
                  str(tmp / "trainable.safetensors"))
        torch.save(shared["optimizer"], tmp / "optimizer.pt")
        torch.save(state.lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if shared["ema"] is not None:
            torch.save(shared["ema"], tmp / "ema.pt")
        if self.accelerator.scaler is not None:  # fp16: the loss scale is part of the state
            torch.save(self.accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if shared["finetuner"] is not None:  # e.g. an EMA reference model, a reward stat tracker
            torch.save(shared["finetuner"], tmp / "finetuner.pt")
        (tmp / "state.json").write_text(json.dumps(state.counters()))

    def load(self, path: Path, state: TrainingState) -> dict[str, int]:
        """Restore ``state`` from ``path``; returns the counters."""
        acc = self.accelerator
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(state.named_params) - set(weights)
        if missing:
            raise KeyError(f"checkpoint {path} lacks parameters: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, param in state.named_params.items():
                param.copy_(shard_like(weights[name], param))

        def load(name: str) -> Any:  # CPU first: a checkpoint written on cuda:0 loads on any rank/machine
            return load_torch_file(path / name)

        state.optimizer.load_state_dict(load("optimizer.pt"))  # moves its state to the parameters' device
        if state.sharded:
            shard_optimizer_state(state.optimizer)
        state.lr_scheduler.load_state_dict(load("scheduler.pt"))
        params = list(state.named_params.values())
        if state.ema is not None:
            state.ema.load_state_dict(load("ema.pt"))
            state.ema.to(params[0].device)  # next to the weights it averages
            state.ema.shadow_params = [shard_like(s, p) for s, p in zip(state.ema.shadow_params, params)]
        if acc.scaler is not None and (path / "scaler.pt").is_file():
            acc.scaler.load_state_dict(load("scaler.pt"))
        if state.finetuner.keeps_state:
            if not (path / "finetuner.pt").is_file():
                raise FileNotFoundError(f"{path} has no finetuner.pt: it was written by another method")
            state.finetuner.load_state_dict(load("finetuner.pt"))
        own = f"finetuner-rank-{acc.process_index}.pt"
        if state.finetuner.keeps_process_state and (path / own).is_file():
            state.finetuner.load_process_state_dict(load(own))
        elif state.finetuner.keeps_process_state:  # older checkpoints held it in finetuner.pt
            acc.print(f"{path} has no {own} (an older checkpoint): this process resumes the main process's samples")
        rank_file = path / f"rank-{acc.process_index}.json"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{path} has no state for process {acc.process_index}: it was written by fewer processes"
            )
        rank_state = json.loads(rank_file.read_text())
        restore_host_rng_state(rank_state)
        state.source.load_state_dict(rank_state["data"])
        restore_torch_rng_state(load_file(str(path / f"rng-{acc.process_index}.safetensors")))
        counters = json.loads((path / "state.json").read_text())
        counters.setdefault("scaler_skips_in_a_row", 0)
        return counters


def host_rng_state() -> dict[str, Any]:
    """Python's and numpy's global RNG states (with their Gaussian caches), as JSON values."""
    numpy_state = np.random.get_state()
    return {"python_random": random.getstate(),
            "numpy_random": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}  # type: ignore[index]


def restore_host_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python_random"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy_random"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def torch_rng_state() -> dict[str, torch.Tensor]:
    """torch's CPU RNG state and every CUDA device's."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def restore_torch_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[f"cuda_{i}"] for i in range(len(rng) - 1) if f"cuda_{i}" in rng]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
