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

Its parts live beside it in ``genalign.core``: checkpoint, accelerator, distributed (gradient
averaging and clipping, shared with the value learners), signals, data, optimization, metrics_log.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from genalign.core.accelerator import any_process, check_distributed_type, make_accelerator
from genalign.core.checkpoint import Checkpoints, CheckpointWriteError, NonFiniteError, TrainingState
from genalign.core.data import DataSource, PromptSource
from genalign.core.distributed import average_gradients, clip_gradients
from genalign.core.experiment import RunConfig, SampleConfig
from genalign.core.metrics_log import MetricsLog, flatten, progress_fields, scalar
from genalign.core.optimization import averaged_weights, make_optimization
from genalign.core.sharding import any_sharded, is_sharded
from genalign.core.signals import StopSignals
from genalign.core.types import FineTuner

# fp16: the GradScaler halves its scale at each overflow; this many in a row means real NaNs.
MAX_SCALER_SKIPS = 30


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT arrived: the run saved a checkpoint after the current step and stopped."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


@dataclass
class TrainResult:
    steps_done: int
    skipped_steps: int
    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of one micro-step: a pure function of its coordinates (exact resume)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 1_009 + rank)


def loss_and_backward(finetuner: FineTuner, batch: Any, backward: Callable[[torch.Tensor], None]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a collected batch, handed to ``backward`` (see ``FineTuner.backward_loss``)."""
    return finetuner.backward_loss(batch, backward)


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
        self.clock = TrainingClock()  # export.json's clock (restarted by train())
        self.resumed_seconds = (0.0, 0.0)  # a resumed run's training seconds before this launch (wall, CPU)
        self.accelerator = accelerator or make_accelerator(run)
        acc = self.accelerator
        # the training items: prompts, or the method's own data (rows, pairs)
        self.source = DataSource(prompts or run.load_prompts(), run.seed, acc.process_index, acc.num_processes)
        self.resolved_config = resolved_config or {"run": flatten(run.__dict__)}

        self.named_params = finetuner.named_trainable_parameters()
        if not self.named_params:
            raise ValueError("the fine-tuner has no trainable parameters")
        self.params = list(self.named_params.values())
        self.sharded = any_sharded(self.params)  # FSDP: the denoiser was sharded before the fine-tuner was built
        self.optimizer, self.lr_scheduler, self.ema = make_optimization(run, self.params, acc)
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.scaler_skips_in_a_row = 0
        self.stop_signals = StopSignals(acc.print)
        self.log = MetricsLog(self.output_dir / "metrics.jsonl", acc.is_main_process)
        self.store = Checkpoints(self.output_dir / "checkpoints", acc, run.keep_checkpoints)
        self.state = TrainingState(self.named_params, self.optimizer, self.lr_scheduler, self.ema, finetuner,
                                   self.source, self.sharded, self._counters)

    # ------------------------------------------------------------------ checkpoints

    def _counters(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "scaler_skips_in_a_row": self.scaler_skips_in_a_row, "train_seconds": list(self.clock.seconds())}

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return self.store.complete()

    def save_checkpoint(self) -> Path:
        return self.store.save(self.step, self.state)

    def load_checkpoint(self, path: Path) -> None:
        counters = self.store.load(path, self.state)
        self.resumed_seconds = tuple(counters.pop("train_seconds", (0.0, 0.0)))  # older checkpoints: none
        for name, value in counters.items():
            setattr(self, name, value)

    def resume(self, checkpoint: str | Path = "latest") -> bool:
        """Resume from ``latest`` or a given checkpoint folder; False when there is none yet."""
        path = self.store.find(checkpoint)
        if path is None:
            return False
        self.load_checkpoint(path)
        self.accelerator.print(f"resumed from {path} at step {self.step}")
        return True

    def _stop(self) -> None:
        path = self.save_checkpoint()
        number = self.stop_signals.received or signal.SIGTERM
        raise TrainingInterrupted(f"stopped by {signal.Signals(number).name} at step {self.step}; checkpoint {path}; "
                                  "continue with `genalign train CONFIG --resume`", number)

    # ------------------------------------------------------------------ one step

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

    def _out_of_time(self) -> bool:
        """Whether this process's training time is past ``run.max_minutes`` (wall clock) or
        ``run.max_cpu_minutes`` (its CPU time, all threads); a limit of 0 is none."""
        wall, cpu = self.clock.seconds()
        return bool(self.run.max_minutes and wall > 60 * self.run.max_minutes) or bool(
            self.run.max_cpu_minutes and cpu > 60 * self.run.max_cpu_minutes)

    def _clock_fields(self) -> dict[str, str]:
        """The progress bar's view of a clock limit (the step count of a run stopped by the clock is
        only a ceiling): minutes so far against ``run.max_minutes`` / ``run.max_cpu_minutes``."""
        wall, cpu = self.clock.seconds()
        fields = {}
        if self.run.max_minutes:
            fields["min"] = f"{wall / 60:.1f}/{self.run.max_minutes:g}"
        if self.run.max_cpu_minutes:
            fields["cpu_min"] = f"{cpu / 60:.1f}/{self.run.max_cpu_minutes:g}"
        return fields

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; returns the logged metrics, or None when the step was skipped."""
        acc = self.accelerator
        totals: dict[str, float] = {}
        for micro in range(self.run.grad_accum):
            loss, metrics = self._micro_step(micro)
            values = {"loss": loss, **metrics}
            bad = [k for k, v in values.items() if not torch.isfinite(torch.as_tensor(v)).all()]
            if any_process(self.accelerator, bool(bad)):  # drops the step's gradients, non-finite ones included
                self._nonfinite(" and ".join(bad) or "a value on another process")
                return None
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + scalar(v) / self.run.grad_accum
        # DDP's averaging for the plain trainable parameters; sharded ones arrive averaged (FSDP
        # reduce-scatters in the backward)
        average_gradients([p for p in self.params if not is_sharded(p)])
        grad_norm = clip_gradients(self.params, self.run.max_grad_norm, acc)  # the norm before clipping
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
        self.finetuner.after_optimizer_step()  # e.g. move a slowly updated reference toward the policy
        self.nonfinite_in_a_row = 0
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = self.lr_scheduler.get_last_lr()[0]
        if acc.num_processes > 1:
            keys = sorted(totals)
            reduced = acc.reduce(torch.tensor([totals[k] for k in keys], device=acc.device), "mean")
            totals = dict(zip(keys, reduced.tolist()))
        return totals

    def write_samples(self, tag: str) -> Path | None:
        """The sample grid, written by the main process (all sample when sharded: FSDP's forward
        gathers parameters from every process)."""
        if not (self.accelerator.is_main_process or self.sharded):
            return None
        from genalign.core.images import save_grid

        prompts = list(self.sample_config.prompts) or self.finetuner.prompts_of(self.source.items[:4])
        with torch.no_grad(), self.accelerator.autocast():
            images = self.finetuner.sample(prompts, torch.Generator().manual_seed(self.run.seed))
        if not self.accelerator.is_main_process:
            return None
        path = self.output_dir / "samples" / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path)
        (path.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")
        return path

    def train(self, resume: str | Path | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        acc, run = self.accelerator, self.run
        self._start(resume)
        history: list[dict[str, float]] = []
        self.clock = TrainingClock(self.resumed_seconds)  # export.json's clock: training time only, resumes included
        bar = tqdm(total=run.steps, initial=self.step, disable=not acc.is_local_main_process, desc="train")
        with bar, self.stop_signals:
            while self.step < run.steps:
                if (run.max_minutes or run.max_cpu_minutes) and any_process(acc, self._out_of_time()):
                    acc.print(f"run.max_minutes={run.max_minutes} / run.max_cpu_minutes={run.max_cpu_minutes} "
                              f"reached at step {self.step}; saving and exporting")
                    break
                metrics = self.train_step()
                self.step += 1
                bar.update(1)
                if metrics is not None:
                    history.append({"step": self.step, **metrics})
                    self.log.append(history[-1])  # one JSON line a step: easy to plot or grep
                    bar.set_postfix({**progress_fields(metrics), **self._clock_fields()})
                    if run.log_every and self.step % run.log_every == 0:
                        acc.log({**metrics, "skipped_steps": self.skipped_steps}, step=self.step)
                if run.sample_every and self.step % run.sample_every == 0:
                    self.write_samples(f"step-{self.step:06d}")
                if run.checkpoint_every and self.step % run.checkpoint_every == 0 and self.step < run.steps:
                    with self.clock.paused():
                        self.save_checkpoint()
                if run.export_every and self.step % run.export_every == 0 and self.step < run.steps:
                    self.export(self.output_dir / "exports" / f"step-{self.step:06d}")
                if any_process(acc, self.stop_signals.received is not None) and self.step < run.steps:
                    self._stop()
        self._finish()
        return TrainResult(self.step, self.skipped_steps, self.output_dir, history)

    def _start(self, resume: str | Path | None) -> None:
        """The resolved config, the resumed state or fresh seeds, the metrics log, the trackers."""
        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.resolved_config, sort_keys=False))
        resumed = bool(resume and self.resume(resume))
        if not resumed:
            # A fresh run seeds the global RNGs (dropout, any library draws) per process; a resumed
            # one restores them from the checkpoint instead.
            from accelerate.utils import set_seed

            set_seed(self.run.seed, device_specific=True)
        self.log.start(self.step if resumed else None)
        if self.run.tracker != "none":
            acc.init_trackers("genalign", config=flatten(self.resolved_config))

    def _finish(self) -> None:
        """The final checkpoint, sample grid and export (of the EMA weights when kept)."""
        acc = self.accelerator
        with self.clock.paused():
            self.save_checkpoint()
            self.write_samples("final")
        self.export(self.output_dir / "final")
        if self.run.tracker != "none":
            acc.end_training()

    def export(self, folder: Path) -> None:
        """The weights in the backbone's own format (the EMA's when kept), with ``export.json``: the
        step and the seconds of training (a resumed run's launches added up), not counting exports,
        checkpoints and sample grids (``run.export_every``'s learning curves): wall-clock
        (``train_seconds``) and this process's CPU time, every thread's (``train_cpu_seconds``: the
        same on a busy machine as on an idle one)."""
        acc = self.accelerator
        wall, cpu = self.clock.seconds()
        with self.clock.paused():
            if acc.is_main_process or self.sharded:  # sharded: all gather, main writes
                with averaged_weights(self.ema, self.params):
                    self.finetuner.export(folder)
            if acc.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "export.json").write_text(json.dumps(
                    {"step": self.step, "train_seconds": round(wall, 2), "train_cpu_seconds": round(cpu, 2)}) + "\n")


class TrainingClock:
    """Seconds of training since it started, wall-clock and this process's CPU time (all its
    threads), leaving out what ran inside :meth:`paused` (exports, checkpoints), plus ``before``:
    the seconds a resumed run had trained before this launch (saved in its checkpoint)."""

    def __init__(self, before: Sequence[float] = (0.0, 0.0)) -> None:
        self.started = (time.monotonic(), time.process_time())
        self.paused_for = [0.0, 0.0]
        self.before = (float(before[0]), float(before[1]))
        self.frozen: tuple[float, float] | None = None  # the reading while paused (a checkpoint saves it)

    def seconds(self) -> tuple[float, float]:
        if self.frozen is not None:
            return self.frozen
        now = (time.monotonic(), time.process_time())
        wall = self.before[0] + now[0] - self.started[0] - self.paused_for[0]
        return wall, self.before[1] + now[1] - self.started[1] - self.paused_for[1]

    @contextmanager
    def paused(self) -> Iterator[None]:
        if self.frozen is not None:  # already paused
            yield
            return
        self.frozen = self.seconds()
        began = (time.monotonic(), time.process_time())
        try:
            yield
        finally:
            self.paused_for[0] += time.monotonic() - began[0]
            self.paused_for[1] += time.process_time() - began[1]
            self.frozen = None


__all__ = ["CheckpointWriteError", "DataSource", "NonFiniteError", "PromptSource", "TrainResult", "Trainer", "TrainingClock", "TrainingInterrupted",
           "check_distributed_type", "loss_and_backward", "make_accelerator", "step_generator"]
