"""The one training loop every fine-tuner runs in (accelerate underneath).

Per optimizer step: ``grad_accum`` times (collect without gradients -> loss under autocast ->
backward), then clip, optimizer and LR-scheduler step, EMA update, logging, sample grids and
checkpoints. All randomness of a step comes from generators seeded by (seed, step, micro-step,
rank), and the data position, optimizer, scheduler, EMA and RNG states are checkpointed, so a
resumed run continues exactly as the uninterrupted one would have.

Data parallelism: each process collects its own shard of prompts and the gradients of the
trainable parameters are averaged across processes before clipping (what DDP does, without
wrapping the backbone's modules, so a fine-tuner's calls go through the backbone unchanged).
Under FSDP (``genalign.core.sharding``) the denoiser was sharded in place before the fine-tuner was
built: its gradients arrive reduce-scattered, sample grids and exports run on every process, and
checkpoints hold full tensors gathered from the shards (they resume with or without sharding).

Checkpoints are folders ``checkpoints/step-000100`` written under a temporary name and renamed
when complete; a folder without the ``COMPLETE`` marker is never resumed from.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from genalign.core.experiment import RunConfig, SampleConfig
from genalign.core.loading import load_torch_file
from genalign.core.sharding import (
    any_sharded,
    gather_full,
    is_sharded,
    local_part,
    shard_like,
    shard_optimizer_state,
)
from genalign.core.types import FineTuner

CHECKPOINT_PREFIX = "step-"
# fp16: the GradScaler halves its scale at each overflow; this many in a row means real NaNs.
MAX_SCALER_SKIPS = 30
COMPLETE_MARKER = "COMPLETE"


class NonFiniteError(RuntimeError):
    """The loss, a metric or the gradient norm became NaN/inf too many steps in a row."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT arrived: the run saved a checkpoint after the current step and stopped."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class PromptSource:
    """Cycles through the training prompts in a fresh seeded permutation each epoch.

    Each process reads its own interleaved shard (rank, rank + world, ...); the position is part of
    the checkpoint.
    """

    def __init__(self, prompts: Sequence[str], seed: int, rank: int = 0, world_size: int = 1):
        if not prompts:
            raise ValueError("PromptSource needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation (global, all ranks)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def next(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            for _rank in range(self.world_size):
                if self.position >= len(self._order):
                    self.epoch += 1
                    self.position = 0
                    self._order = self._permutation(self.epoch)
                if _rank == self.rank:
                    out.append(self.prompts[self._order[self.position]])
                self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


@dataclass
class TrainResult:
    steps_done: int
    skipped_steps: int
    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of one micro-step: a pure function of its coordinates (exact resume)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 1_009 + rank)


REWARD_METRICS = ("reward_mean", "reward", "reward_w")  # what methods call their batch's reward, in preference


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows of a step's metrics: the loss and the batch reward when the
    method reports one."""
    fields = {"loss": f"{metrics['loss']:.4g}"}
    reward = next((metrics[k] for k in REWARD_METRICS if k in metrics), None)
    if reward is not None:
        fields["reward"] = f"{reward:.4g}"
    return fields


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    value = data if isinstance(data, (int, float, str, bool)) else str(data)
    return {prefix.rstrip("."): value}


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


def loss_and_backward(finetuner: FineTuner, batch: Any, backward: Callable[[torch.Tensor], None]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a collected batch, handed to ``backward``: part by part (each as soon as it is
    computed) for a method with ``backward_loss``, else whole. Returns the loss (detached when it
    came in parts) and the metrics."""
    stepwise = getattr(finetuner, "backward_loss", None)
    if stepwise is not None:
        return stepwise(batch, backward)
    loss, metrics = finetuner.loss(batch)
    backward(loss)
    return loss, metrics


def make_accelerator(run: RunConfig) -> Any:
    """The accelerate ``Accelerator`` of a run (precision, tracker, project folder).

    Without CUDA it is told ``cpu=True``: only then does accelerate pick up the process group of
    ``torchrun`` / ``accelerate launch --multi_gpu`` on CPU machines (gloo). An FSDP launch config is
    genalign's to apply (``genalign.core.sharding.plan_from_environment``, the CLI shards the
    denoiser), so accelerate itself is started as plain multi-process and wraps nothing.
    """
    import os

    from accelerate import Accelerator

    fsdp_flag = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        accelerator = Accelerator(
            mixed_precision=run.mixed_precision,
            log_with=None if run.tracker == "none" else run.tracker,
            project_dir=str(run.output_dir),
            cpu=not torch.cuda.is_available(),
        )
    finally:
        if fsdp_flag is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp_flag
    check_distributed_type(str(accelerator.distributed_type))
    return accelerator


UNSUPPORTED_ENGINES = ("DEEPSPEED", "MEGATRON_LM")


def check_distributed_type(distributed_type: str) -> None:
    """DeepSpeed and Megatron wrap the model in their own engines, which the trainer does not do;
    such a config is refused with what to use instead, rather than silently running unsharded."""
    name = distributed_type.rsplit(".", 1)[-1]
    if name in UNSUPPORTED_ENGINES:
        from genalign.core.config import ConfigError

        raise ConfigError(
            f"accelerate is configured for {name}, which genalign's trainer does not support (it does not hand "
            "the model to an engine). For ZeRO-2 (sharded gradients and optimizer state) launch with "
            "configs/accelerate/fsdp_shard_grad_op.yaml, for ZeRO-3 with configs/accelerate/fsdp.yaml, or plain "
            "data parallelism with ddp_1node.yaml / ddp_multinode.yaml"
        )


class Trainer:
    """Runs a :class:`FineTuner` for ``run.steps`` optimizer steps."""

    def __init__(
        self,
        finetuner: FineTuner,
        run: RunConfig,
        sample: SampleConfig | None = None,
        prompts: Sequence[str] | None = None,
        resolved_config: dict[str, Any] | None = None,
        accelerator: Any = None,
    ):
        self.finetuner = finetuner
        self.run = run
        self.sample_config = sample or SampleConfig()
        self.output_dir = Path(run.output_dir)
        self.accelerator = accelerator or make_accelerator(run)
        acc = self.accelerator
        self.source = PromptSource(prompts or run.load_prompts(), run.seed, acc.process_index, acc.num_processes)
        self.resolved_config = resolved_config or {"run": _flatten(run.__dict__)}

        self.named_params = finetuner.named_trainable_parameters()
        if not self.named_params:
            raise ValueError("the fine-tuner has no trainable parameters")
        self.params = list(self.named_params.values())
        self.sharded = any_sharded(self.params)  # FSDP: the denoiser was sharded before the fine-tuner was built
        optimizer = torch.optim.AdamW(
            self.params, lr=run.lr, betas=run.adam_betas, eps=run.adam_eps, weight_decay=run.weight_decay
        )
        self.optimizer = acc.prepare(optimizer)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            run.lr_scheduler, optimizer, num_warmup_steps=run.warmup_steps, num_training_steps=run.steps
        )
        self.ema = None
        if run.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=run.ema_decay)
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.scaler_skips_in_a_row = 0
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoint_root.is_dir():
            return []
        done = [
            p
            for p in self.checkpoint_root.iterdir()
            if p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).is_file()
        ]
        return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    def _counters(self) -> dict[str, int]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "scaler_skips_in_a_row": self.scaler_skips_in_a_row,
        }

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = self.checkpoint_root / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        tmp = self.checkpoint_root / f".tmp-{CHECKPOINT_PREFIX}{self.step:06d}"
        # Every process checks its part (FSDP: its shards), so that all raise together.
        bad = [name for name, param in self.named_params.items() if not torch.isfinite(local_part(param)).all()]
        if self._any_process(bool(bad)):
            where = f"parameter {bad[0]}" if bad else "a parameter on another process"
            raise NonFiniteError(f"step {self.step}: {where} is not finite; refusing to checkpoint")
        # Full tensors, kept by the writing process only (FSDP: gathered from the shards).
        shared = self._shared_state(gather_full(self.named_params, keep=acc.is_main_process))
        acc.wait_for_everyone()
        try:
            self._write_checkpoint(tmp, shared)
        except OSError as err:  # disk full, quota, permissions: keep what was there
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.checkpoints()
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not write checkpoint {final} ({err}); {kept}") from err
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.run.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _shared_state(self, weights: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """What the main process writes, as full tensors; every process takes part in gathering
        sharded state (FSDP) and only the main one keeps it (None elsewhere)."""
        keep = self.accelerator.is_main_process
        if not (keep or self.sharded):
            return None  # nothing to gather, nothing to write
        finetuner_state = getattr(self.finetuner, "state_dict", None)
        state = {
            "weights": weights,
            "optimizer": gather_full(self.optimizer.state_dict(), keep),
            "ema": gather_full(self.ema.state_dict(), keep) if self.ema is not None else None,
            "finetuner": gather_full(finetuner_state(), keep) if finetuner_state is not None else None,
        }
        return state if keep else None

    def _write_checkpoint(self, tmp: Path, shared: dict[str, Any] | None) -> None:
        """Every file of a checkpoint into the temporary folder ``tmp``. A write error on any process
        is raised on every process (none is left waiting at a barrier)."""
        acc = self.accelerator
        error: OSError | None = None
        if acc.is_main_process:
            try:
                self._write_shared_state(tmp, shared)
            except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
                error = err if isinstance(err, OSError) else OSError(str(err).splitlines()[0])
        if self._any_process(error is not None):
            raise error or OSError("the main process could not write the checkpoint")
        try:  # per process: the data position and every RNG (with the Gaussian caches of random/numpy)
            numpy_state = np.random.get_state()
            rank_state = {
                "python_random": random.getstate(),
                "numpy_random": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                "data": self.source.state_dict(),
            }
            (tmp / f"rank-{acc.process_index}.json").write_text(json.dumps(rank_state))
            process_state = getattr(self.finetuner, "process_state_dict", None)
            if process_state is not None:  # this process's own samples: a rollout, a replay buffer
                torch.save(process_state(), tmp / f"finetuner-rank-{acc.process_index}.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / f"rng-{acc.process_index}.safetensors"))
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
            error = err if isinstance(err, OSError) else OSError(str(err).splitlines()[0])
        if self._any_process(error is not None):
            raise error or OSError("another process could not write its part of the checkpoint")

    def _write_shared_state(self, tmp: Path, shared: dict[str, Any]) -> None:
        """The main process's part: weights, optimizer, scheduler, EMA, scaler, method state, counters."""
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().float().cpu().contiguous() for n, p in shared["weights"].items()},
                  str(tmp / "trainable.safetensors"))
        torch.save(shared["optimizer"], tmp / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if shared["ema"] is not None:
            torch.save(shared["ema"], tmp / "ema.pt")
        if self.accelerator.scaler is not None:  # fp16: the loss scale is part of the state
            torch.save(self.accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if shared["finetuner"] is not None:  # e.g. an EMA reference model, a reward stat tracker
            torch.save(shared["finetuner"], tmp / "finetuner.pt")
        (tmp / "state.json").write_text(json.dumps(self._counters()))

    def load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(self.named_params) - set(weights)
        if missing:
            raise KeyError(f"checkpoint {path} lacks parameters: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, param in self.named_params.items():
                param.copy_(shard_like(weights[name], param))

        def load(name: str) -> Any:  # CPU first: a checkpoint written on cuda:0 loads on any rank/machine
            return load_torch_file(path / name)

        self.optimizer.load_state_dict(load("optimizer.pt"))  # moves its state to the parameters' device
        if self.sharded:
            shard_optimizer_state(self.optimizer)
        self.lr_scheduler.load_state_dict(load("scheduler.pt"))
        if self.ema is not None:
            self.ema.load_state_dict(load("ema.pt"))
            self.ema.to(self.params[0].device)  # next to the weights it averages
            self.ema.shadow_params = [shard_like(s, p) for s, p in zip(self.ema.shadow_params, self.params)]
        if acc.scaler is not None and (path / "scaler.pt").is_file():
            acc.scaler.load_state_dict(load("scaler.pt"))
        if hasattr(self.finetuner, "load_state_dict"):
            if not (path / "finetuner.pt").is_file():
                raise FileNotFoundError(f"{path} has no finetuner.pt: it was written by another method")
            self.finetuner.load_state_dict(load("finetuner.pt"))
        own = f"finetuner-rank-{acc.process_index}.pt"
        if hasattr(self.finetuner, "load_process_state_dict") and (path / own).is_file():
            self.finetuner.load_process_state_dict(load(own))
        elif hasattr(self.finetuner, "load_process_state_dict"):  # older checkpoints held it in finetuner.pt
            acc.print(f"{path} has no {own} (an older checkpoint): this process resumes the main process's samples")
        state = json.loads((path / "state.json").read_text())
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.scaler_skips_in_a_row = state.get("scaler_skips_in_a_row", 0)
        rank_file = path / f"rank-{acc.process_index}.json"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{path} has no state for process {acc.process_index}: it was written by fewer processes"
            )
        rank_state = json.loads(rank_file.read_text())
        version, internal, gauss_next = rank_state["python_random"]
        random.setstate((version, tuple(internal), gauss_next))
        name, keys, pos, has_gauss, cached = rank_state["numpy_random"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        self.source.load_state_dict(rank_state["data"])
        rng = load_file(str(path / f"rng-{acc.process_index}.safetensors"))
        torch.set_rng_state(rng["torch"])
        cuda_states = [rng[f"cuda_{i}"] for i in range(len(rng) - 1) if f"cuda_{i}" in rng]
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)

    def resume(self, checkpoint: str | Path = "latest") -> bool:
        """Resume from ``latest`` or a given checkpoint folder; False when there is none yet."""
        if str(checkpoint) == "latest":
            found = self.checkpoints()
            if not found:
                return False
            path = found[-1]
        else:
            path = Path(checkpoint)
        self.load_checkpoint(path)
        self.accelerator.print(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ stopping on signals

    def _catch_stop_signals(self) -> dict[int, Any]:
        """SIGTERM (schedulers' pre-emption) and SIGINT (Ctrl-C) finish the current step, save a
        checkpoint and stop; a second signal stops at once. Only in the main thread (Python's rule), and
        not for a signal the process ignores (SIGINT in a shell script's background job stays ignored)."""
        self.stop_signal: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(number: int, frame: Any) -> None:
            self.stop_signal = number
            signal.signal(number, signal.SIG_DFL if number == signal.SIGTERM else signal.default_int_handler)
            self.accelerator.print(f"\n{signal.Signals(number).name}: saving a checkpoint after this step, then "
                                   "stopping (send it again to stop at once)")

        return {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(number) is not signal.SIG_IGN}

    def _stop(self) -> None:
        path = self.save_checkpoint()
        number = self.stop_signal or signal.SIGTERM
        raise TrainingInterrupted(f"stopped by {signal.Signals(number).name} at step {self.step}; checkpoint {path}; "
                                  "continue with `genalign train CONFIG --resume`", number)

    # ------------------------------------------------------------------ the loop

    def _micro_step(self, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Collect one micro-batch, compute its loss and backward it."""
        acc = self.accelerator
        generator = step_generator(self.run.seed, self.step, micro, acc.process_index)
        prompts = self.source.next(self.run.batch_size)
        with torch.no_grad(), acc.autocast():
            batch = self.finetuner.collect(prompts, generator)
        with acc.autocast():
            return loss_and_backward(self.finetuner, batch, self._backward)

    def _backward(self, loss: torch.Tensor) -> None:
        with torch.autocast(self.accelerator.device.type, enabled=False):  # backward outside autocast
            self.accelerator.backward(loss / self.run.grad_accum)

    def _nonfinite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.skipped_steps += 1
        if self.nonfinite_in_a_row > self.run.nan_tolerance:
            last = self.checkpoints()
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
            raise NonFiniteError(
                f"step {self.step + 1}: {what} is not finite ({self.nonfinite_in_a_row} step(s) in a row; "
                f"run.nan_tolerance={self.run.nan_tolerance}); stopping, {where}. Try a lower run.lr, "
                f"run.max_grad_norm, or run.mixed_precision=bf16 instead of fp16"
            )
        self.accelerator.print(f"step {self.step + 1}: {what} is not finite; step skipped")

    def _any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (so that all skip or stop together)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; returns the logged metrics, or None when the step was skipped."""
        acc = self.accelerator
        totals: dict[str, float] = {}
        for micro in range(self.run.grad_accum):
            loss, metrics = self._micro_step(micro)
            values = {"loss": loss, **metrics}
            bad = [k for k, v in values.items() if not torch.isfinite(torch.as_tensor(v)).all()]
            if self._any_process(bool(bad)):  # drops the step's gradients, non-finite ones included
                self._nonfinite(" and ".join(bad) or "a value on another process")
                return None
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + _scalar(v) / self.run.grad_accum
        self._average_gradients_across_processes()
        grad_norm = self._clip_gradients()
        scaled = acc.scaler is not None  # fp16: overflowing gradients are the GradScaler's to handle
        if not scaled and not torch.isfinite(torch.as_tensor(grad_norm)):
            self._nonfinite("the gradient norm")
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if scaled and self.optimizer.step_was_skipped:  # the scaler lowered its scale
            self.skipped_steps += 1
            self.scaler_skips_in_a_row += 1
            if self.scaler_skips_in_a_row > MAX_SCALER_SKIPS:
                raise NonFiniteError(
                    f"step {self.step + 1}: fp16 gradients were not finite for {self.scaler_skips_in_a_row} steps "
                    f"in a row (loss scale now {acc.scaler.get_scale():.3g}); stopping. Try "
                    f"run.mixed_precision=bf16 or a lower run.lr"
                )
            return None
        self.scaler_skips_in_a_row = 0
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.params)
        after_step = getattr(self.finetuner, "after_optimizer_step", None)
        if after_step is not None:  # e.g. move a slowly updated reference toward the policy
            after_step()
        self.nonfinite_in_a_row = 0
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = self.lr_scheduler.get_last_lr()[0]
        if acc.num_processes > 1:
            keys = sorted(totals)
            reduced = acc.reduce(torch.tensor([totals[k] for k in keys], device=acc.device), "mean")
            totals = dict(zip(keys, reduced.tolist()))
        return totals

    def _clip_gradients(self) -> float:
        """Clip to ``run.max_grad_norm`` and return the norm before clipping. With max_grad_norm = 0
        an infinite bound still unscales (fp16) and measures the norm. Sharded gradients' norm is
        the norm of the full gradient (DTensor arithmetic reduces across the shards)."""
        bound = self.run.max_grad_norm or float("inf")
        if not self.sharded:
            return self.accelerator.clip_grad_norm_(self.params, bound)
        self.accelerator.unscale_gradients()
        grads = [p.grad for p in self.params if p.grad is not None]
        groups = [[g for g in grads if is_sharded(g)], [g for g in grads if not is_sharded(g)]]
        squares = []
        for group in groups:
            if group:
                norm = torch.nn.utils.get_total_norm(group)
                squares.append((norm.full_tensor() if is_sharded(norm) else norm).float() ** 2)
        total = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
        scale = bound / (total + 1e-6)  # torch's clip_grad_norm_ formula
        # In place on each shard (torch.nn.utils.clip_grads_with_norm_ was seen to leave DTensor gradients unscaled).
        if scale < 1.0:
            for grad in grads:
                grad.mul_(scale)
        return total

    def _average_gradients_across_processes(self) -> None:
        """DDP's gradient averaging for the plain (unsharded) trainable parameters; sharded ones
        arrive averaged (FSDP reduce-scatters in the backward)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        params = [p for p in self.params if not is_sharded(p)]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = acc.reduce(flat, reduction="mean")
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
            offset += grad.numel()

    def write_samples(self, tag: str) -> Path | None:
        """The sample grid, written by the main process (all sample when sharded: FSDP's forward
        gathers parameters from every process)."""
        if not (self.accelerator.is_main_process or self.sharded):
            return None
        from torchvision.utils import save_image

        prompts = list(self.sample_config.prompts) or self.source.prompts[:4]
        with torch.no_grad(), self.accelerator.autocast():
            images = self.finetuner.sample(prompts, torch.Generator().manual_seed(self.run.seed))
        if not self.accelerator.is_main_process:
            return None
        path = self.output_dir / "samples" / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.float().clamp(0, 1), path, nrow=min(len(prompts), 8))
        (path.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")
        return path

    def train(self, resume: str | Path | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        acc = self.accelerator
        run = self.run
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.resolved_config, sort_keys=False))
        if not (resume and self.resume(resume)):
            # A fresh run seeds the global RNGs (dropout, any library draws) per process; a resumed
            # one restores them from the checkpoint instead.
            from accelerate.utils import set_seed

            set_seed(run.seed, device_specific=True)
            if acc.is_main_process:  # a fresh run in a used folder starts a fresh log
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
        elif acc.is_main_process:  # a resumed run drops the lines of steps it will redo
            log = self.output_dir / "metrics.jsonl"
            if log.is_file():
                kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
                log.write_text("".join(line + "\n" for line in kept))
        if run.tracker != "none":
            acc.init_trackers("genalign", config=_flatten(self.resolved_config))
        history: list[dict[str, float]] = []
        bar = tqdm(total=run.steps, initial=self.step, disable=not acc.is_local_main_process, desc="train")
        previous_handlers = self._catch_stop_signals()
        deadline = time.monotonic() + 60 * run.max_minutes if run.max_minutes else None
        try:
            while self.step < run.steps:
                if deadline is not None and self._any_process(time.monotonic() > deadline):
                    acc.print(f"run.max_minutes={run.max_minutes} reached at step {self.step}; saving and exporting")
                    break
                metrics = self.train_step()
                self.step += 1
                bar.update(1)
                if metrics is not None:
                    history.append({"step": self.step, **metrics})
                    if acc.is_main_process:  # one JSON line a step: easy to plot or grep
                        with open(self.output_dir / "metrics.jsonl", "a") as log:
                            log.write(json.dumps(history[-1]) + "\n")
                    bar.set_postfix(progress_fields(metrics))
                    if run.log_every and self.step % run.log_every == 0:
                        acc.log({**metrics, "skipped_steps": self.skipped_steps}, step=self.step)
                if run.sample_every and self.step % run.sample_every == 0:
                    self.write_samples(f"step-{self.step:06d}")
                if run.checkpoint_every and self.step % run.checkpoint_every == 0 and self.step < run.steps:
                    self.save_checkpoint()
                if self._any_process(self.stop_signal is not None) and self.step < run.steps:
                    self._stop()
        finally:
            bar.close()
            for number, handler in previous_handlers.items():
                signal.signal(number, handler)
        self.save_checkpoint()
        self.write_samples("final")
        export = getattr(self.finetuner, "export", None)
        if export is not None and (acc.is_main_process or self.sharded):  # sharded: all gather, main writes
            if self.ema is not None:  # export the averaged weights, then put the trained ones back
                self.ema.store(self.params)
                self.ema.copy_to(self.params)
            export(self.output_dir / "final")
            if self.ema is not None:
                self.ema.restore(self.params)
        if run.tracker != "none":
            acc.end_training()
        return TrainResult(self.step, self.skipped_steps, self.output_dir, history)

