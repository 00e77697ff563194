"""Pieces several fine-tuners share: per-sample errors, exporting what was trained, a slowly
updated (EMA) copy of the trainable parameters that can stand in for them, sample grids."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genalign.core.rollout import rollout
from genalign.core.sharding import local_part, reshard, shard_like
from genalign.core.types import Backbone, FineTuner, scored_elsewhere


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """(B, ...) x (B, ...) -> (B,) mean squared error per sample, in fp32."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


@torch.no_grad()
def sample_images(backbone: Backbone, prompts: list[str], generator: torch.Generator, num_steps: int,
                  guidance_scale: float) -> Tensor:
    return rollout(backbone, prompts, num_steps, guidance_scale, generator=generator).images


class BackboneMethod(FineTuner):
    """What the methods that train the backbone share: its trainable parameters, sample grids with
    the experiment's sampling settings, and exporting the result."""

    backbone: Backbone
    params: dict[str, nn.Parameter]
    sample_config: Any

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self.params

    def zero_loss(self) -> Tensor:
        """A loss of 0 attached to the parameters: a well-defined step without gradient (a batch
        whose pairs were all ties). Under FSDP it is an error: this process would skip the denoiser
        passes the others run, and their collectives would no longer match (see
        ``genalign.core.sharding``); failing here names the cause instead of stalling the job."""
        if self.backbone.sharded:
            raise RuntimeError(
                f"{type(self).__name__}: this process's micro-batch has nothing to train on (all pairs tied or "
                "every advantage dropped) and under FSDP it cannot skip its denoiser passes. Use a reward with "
                "fewer ties, a larger run.batch_size, method.min_reward_gap 0 / drop_zero_advantage false, or "
                "a data-parallel launch config"
            )
        return sum(local_part(p).sum() for p in self.params.values()) * 0.0

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator) -> Tensor:
        return sample_images(self.backbone, prompts, generator, self.sample_config.num_steps,
                             self.sample_config.guidance_scale)

    def export(self, directory: Path) -> None:
        self.backbone.export(directory)


class LossInParts:
    """A loss that is a sum of parts (one per trained denoising step), from ``_loss_parts(batch,
    metrics)``, which yields the parts and fills ``metrics`` as it goes.

    The trainer calls :meth:`backward_loss`: each part is backwarded as soon as it is computed, so
    a step costs the memory of one part and no forward is recomputed in the backward (activation
    checkpointing per step would add one forward pass per step). :meth:`loss` holds every part's
    graph at once (for tests and direct use)."""

    def _loss_parts(self, batch: Any, metrics: dict[str, Tensor]) -> Iterator[Tensor]:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        metrics: dict[str, Tensor] = {}
        parts = list(self._loss_parts(batch, metrics))
        return sum(parts[1:], parts[0]), metrics

    def backward_loss(self, batch: Any, backward: Callable[[Tensor], None]) -> tuple[Tensor, dict[str, Tensor]]:
        metrics: dict[str, Tensor] = {}
        total: Tensor | None = None
        for part in self._loss_parts(batch, metrics):
            backward(part)
            total = part.detach() if total is None else total + part.detach()
        assert total is not None, "_loss_parts yielded nothing"
        return total, metrics


class ShadowParameters:
    """An exponential moving average of parameters, swappable into them.

    ``update(rate)``: shadow <- shadow + rate * (param - shadow). ``swapped()``: within the context
    the parameters hold the shadow values (e.g. a reference model that follows the policy slowly).
    Starts equal to the parameters (for a fresh LoRA: exactly the base model).
    """

    def __init__(self, named: dict[str, nn.Parameter], module: nn.Module | None = None):
        self.params = named
        self.module = module  # the parameters' module: under FSDP its gathered copies are freed around swaps
        self.shadow = {name: p.detach().clone().float() for name, p in named.items()}

    @torch.no_grad()
    def update(self, rate: float) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), rate)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        self._reshard()  # a forward in the context must gather the swapped values, not reuse gathered ones
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            self._reshard()
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])

    def _reshard(self) -> None:
        if self.module is not None:
            reshard(self.module)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"shadow parameters missing from the checkpoint: {sorted(missing)[:5]}")
        for name in self.shadow:
            self.shadow[name] = shard_like(state[name].float(), self.shadow[name])  # sharded under FSDP


class OverlappedScores:
    """A rollout's chunks scored as they are decoded, on a background thread, while the sampler goes
    on with the next chunk: for a reward whose ``overlaps`` is true (one served by another process,
    ``reward: {name: remote}``), so the policy does not wait for it. Pass it as ``rollout``'s
    ``on_chunk``; :meth:`results` gives the (B,) scores and the sub-scores in image order, the same as
    one call on all the images (each image's score does not depend on its batch). A chunk whose
    scoring failed stops the rollout at the next chunk with that error; :meth:`close` (also on
    leaving a ``with`` block) lets the thread go (a daemon: it never holds the process at exit)."""

    def __init__(self, reward: Any, prompts: list[str], metadata: list[dict[str, Any]] | None = None):
        import queue
        import threading

        self.reward, self.prompts, self.metadata = reward, prompts, metadata
        self.jobs: queue.Queue[tuple[Tensor, list[str], Any] | None] = queue.Queue()
        self.done: list[tuple[Tensor, dict[str, Tensor]]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="scoring", daemon=True)
        self.thread.start()

    @classmethod
    def for_reward(cls, reward: Any, prompts: list[str], metadata: list[dict[str, Any]] | None = None
                   ) -> OverlappedScores | None:
        """An instance when ``reward`` is scored elsewhere (``reward.overlaps``), else None."""
        return cls(reward, prompts, metadata) if scored_elsewhere(reward) else None

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue  # drain: nothing more is scored after a failure
            images, prompts, metadata = job
            try:
                with torch.no_grad():
                    scores, subscores = self.reward(images, prompts, metadata)
                self.done.append((scores.detach().float().cpu(),
                                  {k: v.detach().float().cpu() for k, v in subscores.items()}))
            except BaseException as err:  # noqa: BLE001 - raised in the rollout's thread
                self.error = err

    def __call__(self, start: int, images: Tensor) -> None:
        if self.error is not None:
            raise self.error
        end = start + len(images)
        metadata = None if self.metadata is None else self.metadata[start:end]
        self.jobs.put((images.detach(), self.prompts[start:end], metadata))

    def results(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The scores (B,) and the sub-scores, in image order, as one reward call would give them."""
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if not self.done:
            raise RuntimeError("no rollout chunk was handed over to score")
        return (torch.cat([scores for scores, _ in self.done]),
                {k: torch.cat([sub[k] for _, sub in self.done]) for k in self.done[0][1]})

    def result(self) -> Tensor:
        return self.results()[0]

    def close(self) -> None:
        """Stop after the chunk being scored, without waiting for it."""
        self.error = self.error or RuntimeError("closed")
        self.jobs.put(None)

    def __enter__(self) -> OverlappedScores:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.thread.is_alive():
            self.close()
