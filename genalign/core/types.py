"""The contracts every backbone, reward and fine-tuner fits (see docs/architecture.md, "Contracts")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from genalign.core.schedules import NoiseSchedule


@dataclass
class Conditioning:
    """Encoded prompts, opaque to everything but the backbone that made them.

    ``positive`` and ``negative`` map names (``prompt_embeds``, ``pooled``, ``time_ids`` ...) to
    tensors whose first dimension is the batch. ``negative`` is the unconditional / negative-prompt
    branch used by classifier-free guidance (``None`` when guidance is off).
    """

    positive: dict[str, Tensor]
    negative: dict[str, Tensor] | None = None
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return next(iter(self.positive.values())).shape[0]

    def select(self, index: Tensor | slice | Sequence[int]) -> Conditioning:
        """Rows ``index`` of every tensor (and prompt)."""
        if isinstance(index, slice):
            prompts = self.prompts[index]
        else:
            index = torch.as_tensor(index)
            if index.dtype == torch.bool:
                index = index.nonzero().squeeze(1)
            idx = index.tolist()
            prompts = [self.prompts[i] for i in idx] if self.prompts else []
        negative = None if self.negative is None else {k: v[index] for k, v in self.negative.items()}
        return Conditioning({k: v[index] for k, v in self.positive.items()}, negative, prompts)

    def repeat_interleave(self, n: int) -> Conditioning:
        """Each row ``n`` times in a row (n samples per prompt)."""

        def rep(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.repeat_interleave(n, dim=0) for k, v in d.items()}

        negative = None if self.negative is None else rep(self.negative)
        return Conditioning(rep(self.positive), negative, [p for p in self.prompts for _ in range(n)])

    def detach(self) -> Conditioning:
        negative = None if self.negative is None else {k: v.detach() for k, v in self.negative.items()}
        return Conditioning({k: v.detach() for k, v in self.positive.items()}, negative, list(self.prompts))


@dataclass
class Trajectory:
    """A sampling run x_T -> x_0 of ``num_steps`` steps.

    latents:   (T+1, B, C, H, W), latents[0] = x_T (initial noise), latents[-1] = x_0
    timesteps: (T,) model timesteps, noisiest first; step i goes latents[i] -> latents[i+1]
    log_probs: (B, T) log-density of each step's output (0 for deterministic steps)
    means:     (T, B, C, H, W) step means; stds: (T, B, C, H, W) or broadcastable
    """

    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor
    means: Tensor
    stds: Tensor
    cond: Conditioning
    eta: float
    guidance_scale: float

    @property
    def final(self) -> Tensor:
        return self.latents[-1]

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


@runtime_checkable
class Backbone(Protocol):
    """One model family behind one interface (pipelines/ implements it).

    A fine-tuner only talks to this: it never reaches into a UNet or transformer.
    """

    schedule: NoiseSchedule
    device: torch.device
    dtype: torch.dtype

    @property
    def parameterisation(self) -> str:
        """``epsilon``, ``v_prediction`` or ``flow``."""

    @property
    def resolution(self) -> int:
        """The model's default image size in pixels."""

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of the given size (default: the model's)."""

    def encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning: ...

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Model output at x_t (B, C, H, W), classifier-free guided when ``guidance_scale != 1``."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], differentiable."""

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (the VAE mean, scaled)."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]: ...

    def reference(self) -> AbstractContextManager[None]:
        """Within this context ``predict`` is the frozen reference model."""

    def training(self) -> AbstractContextManager[None]:
        """Within this context the trained modules are in train mode (dropout on)."""


@runtime_checkable
class Reward(Protocol):
    """Score images against prompts; higher is better."""

    differentiable: bool

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """images (B, 3, H, W) in [0, 1] -> (scores (B,), named sub-scores each (B,))."""


@runtime_checkable
class FineTuner(Protocol):
    """A method: what to train, how to collect data, and its loss.

    The trainer owns the optimizer, precision, accumulation, logging and checkpoints.
    """

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]: ...

    def collect(self, prompts: list[str], generator: torch.Generator) -> Any:
        """Roll out / build the data of one micro-batch, without gradients."""

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss and named metrics (each a scalar or a (B,) tensor)."""

    def sample(self, prompts: list[str], generator: torch.Generator) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] of the current model, for sample grids."""

    # Optional, used when present: ``training_prompts() -> list[str]`` (the method's own data,
    # e.g. offline pair ids, instead of run.prompts), ``backward_loss(batch, backward) -> (loss,
    # metrics)`` (the loss as a sum of parts, each handed to ``backward`` as soon as it is computed,
    # the value returned detached: memory of one part without recomputing it in the backward, e.g.
    # one denoising step of a trajectory), ``after_optimizer_step()``,
    # ``state_dict() / load_state_dict(state)`` (saved in checkpoints; tensors and plain
    # containers only, loaded with weights_only=True), ``export(directory)``.

