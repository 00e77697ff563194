"""The contracts every backbone, reward and fine-tuner fits (see docs/architecture.md, "Contracts")."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
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
    eta:       the stochasticity of every step, or one per step (an SDE window)
    sde:       the form of its stochastic steps (``cps``, ``cps_gaussian``: coefficients-preserving, flow models)
    """

    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor
    means: Tensor
    stds: Tensor
    cond: Conditioning
    eta: float | list[float]
    guidance_scale: float
    sde: str = "default"

    def eta_at(self, step: int) -> float:
        """The stochasticity of step ``step``."""
        return float(self.eta[step]) if isinstance(self.eta, (list, tuple)) else float(self.eta)

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

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """(C, h, w) of the latents for an image of the given size (default: the model's); video
        models (``video``): (C, f, h, w) for their ``frames``."""

    def encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True,
        images: Tensor | None = None,
    ) -> Conditioning:
        """Prompts (and, for editing models, their source images (B, 3, H, W) in [0, 1]; without
        them, the images the backbone was given for those prompts) as the denoiser's conditioning."""

    @property
    def takes_images(self) -> bool:
        """Whether prompts are edit instructions on a source image (FLUX.1 Kontext, Qwen-Image-Edit)."""

    @property
    def video(self) -> bool:
        """Whether it generates videos (Wan): latents (B, C, f, h, w), ``decode`` -> (B, F, 3, H, W)."""

    # editing models: the source image (3, H, W) in [0, 1] of each instruction prompt they were given
    source_images: dict[str, Tensor]

    def set_source_images(self, images: dict[str, Tensor]) -> None:
        """Add source images by prompt (editing models; others refuse)."""

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Model output at x_t (B, C, H, W), classifier-free guided when ``guidance_scale != 1``."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], differentiable; video models: videos (B, F, 3, H, W)."""

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (the VAE mean, scaled)."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]: ...

    def reference(self) -> AbstractContextManager[None]:
        """Within this context ``predict`` is the frozen reference model."""

    def merged(self) -> AbstractContextManager[None]:
        """Within this context, calls without gradient may run the LoRA merged into the weights it
        wraps (faster, the same within fp32 rounding); the weights are as before afterwards. The
        sampler enters it for steps without gradient; a backbone with nothing to merge yields."""

    def keep_reference(self) -> None:
        """Make :meth:`reference` available: under full fine-tuning a frozen copy of the starting
        denoiser is kept (a no-op for LoRA, whose reference is the model with its adapters off).
        Call it before training changes the weights."""

    @property
    def unwrapped_denoiser(self) -> nn.Module:
        """The UNet / transformer itself (not a compiled or sharded wrapper's facade)."""

    @property
    def sharded(self) -> bool:
        """Whether the denoiser is sharded across processes (FSDP)."""

    @property
    def compiled(self) -> str:
        """Which of the denoiser's calls go through ``torch.compile``: none, sampling or all
        (``backbone.compile``; none where it fell back to eager)."""

    def load_lora(self, path: str | Path) -> None:
        """Load LoRA weights (a diffusers-format file or folder) into the denoiser."""

    def unload_lora(self) -> None:
        """Remove the LoRA :meth:`load_lora` loaded (the base samples again)."""

    def export(self, directory: str | Path) -> Path:
        """Write what was trained (the LoRA, or the denoiser under full fine-tuning); returns its path."""

    def training(self) -> AbstractContextManager[None]:
        """Within this context the trained modules are in train mode (dropout on)."""


@runtime_checkable
class Reward(Protocol):
    """Score images against prompts; higher is better.

    Two optional attributes, read through :func:`reward_label` and :func:`scored_elsewhere` (a
    plain callable with ``differentiable`` is a whole reward): ``label``, the name of its own
    sub-score (``RewardModel.label``), and ``overlaps``, true when it is scored by another process,
    so that methods score each rollout chunk while sampling the next (``rewards/remote.py``).
    """

    differentiable: bool

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1] -> (scores (B,), named sub-scores each (B,))."""


def reward_label(reward: Reward) -> str | None:
    """The name of ``reward``'s own sub-score (its total's), or None for a reward that names none."""
    return getattr(reward, "label", None) or getattr(reward, "name", None)


def scored_elsewhere(reward: Reward) -> bool:
    """Whether ``reward`` is scored by another process (its ``overlaps``; False when it says nothing)."""
    return bool(getattr(reward, "overlaps", False))


class FineTuner(ABC):
    """A method: what to train, how to collect data, and its loss. Subclass it, define the four
    abstract methods, and override the hooks below where the method needs them (their defaults
    do nothing).

    The trainer owns the optimizer, precision, accumulation, logging and checkpoints.
    """

    @abstractmethod
    def named_trainable_parameters(self) -> dict[str, nn.Parameter]: ...

    @abstractmethod
    def collect(self, prompts: list[Any], generator: torch.Generator) -> Any:
        """Roll out / build the data of one micro-batch, without gradients, from its items: prompts,
        or the method's own :meth:`training_data` items."""

    @abstractmethod
    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss and named metrics (each a scalar or a (B,) tensor)."""

    @abstractmethod
    def sample(self, prompts: list[str], generator: torch.Generator) -> Tensor:
        """Images (B, 3, H, W) (video models: videos (B, F, 3, H, W)) in [0, 1] of the current model, for
        sample grids."""

    # ---------------------------------------------------------------- hooks with defaults

    def training_data(self) -> Sequence[Any] | None:
        """The method's own training items (dataset row indices, labelled pair ids) that the trainer
        shuffles, shards and checkpoints and hands to :meth:`collect` instead of ``run.prompts``'
        prompts; None: run.prompts."""
        return None

    def prompts_of(self, items: list[Any]) -> list[str]:
        """The prompts of some training items (for sample grids): the items themselves by default."""
        return [str(item) for item in items]

    def backward_loss(self, batch: Any, backward: Callable[[Tensor], None]) -> tuple[Tensor, dict[str, Tensor]]:
        """Hand the batch's loss to ``backward`` and return (loss, metrics). A method whose loss is
        a sum of parts (one denoising step each) backwards each part as soon as it is computed and
        returns the sum detached: the memory of one part, without recomputing it in the backward."""
        loss, metrics = self.loss(batch)
        backward(loss)
        return loss, metrics

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (e.g. move a slowly updated reference toward the policy)."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """State every process shares, saved in checkpoints (``finetuner.pt``; tensors and plain
        containers only, loaded with weights_only=True); None: the method keeps none."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None

    def process_state_dict(self) -> dict[str, Any] | None:
        """This process's own state (its rollout, replay buffer), saved per process; None: none."""
        return None

    def load_process_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`process_state_dict` returned."""
        return None

    def export(self, directory: Path) -> None:
        """Write the trained result (e.g. the LoRA in diffusers format) to ``directory``."""
        return None

    @property
    def keeps_state(self) -> bool:
        """Whether the method overrides :meth:`state_dict` (a checkpoint must then hold it)."""
        return type(self).state_dict is not FineTuner.state_dict

    @property
    def keeps_process_state(self) -> bool:
        return type(self).process_state_dict is not FineTuner.process_state_dict

