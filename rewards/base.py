"""What every reward adapter shares: the call contract and its input checks, frozen and cached
reward models, activation checkpointing that works in eval mode.

An adapter subclasses :class:`RewardModel`, sets ``name`` and ``differentiable`` and implements
``score(images, prompts, metadata) -> scores (B,)``; an adapter with extra named sub-scores
computed in the same pass implements ``score_with_subscores`` instead. Everything is on tensors; differentiable adapters never leave torch, so gradients
reach the pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genalign.core.loading import load_torch_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Metadata = Sequence[Mapping[str, Any]] | None


class RewardInputError(ValueError):
    """Images, prompts or metadata that do not fit the Reward contract."""


def check_inputs(images: Tensor, prompts: Sequence[str], metadata: Metadata) -> None:
    """The contract: images (B, 3, H, W) or videos (B, F, 3, H, W), float in [0, 1], B prompts, B
    metadata rows if any."""
    if not isinstance(images, Tensor) or images.ndim not in (4, 5) or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RewardInputError(f"rewards take images of shape (B, 3, H, W) or videos (B, F, 3, H, W); got {shape}")
    if not images.is_floating_point():
        raise RewardInputError(f"rewards take float images in [0, 1]; got dtype {images.dtype}")
    if isinstance(prompts, str):
        raise RewardInputError("prompts must be a sequence of strings, one per image, not one string")
    if len(prompts) != images.shape[0]:
        raise RewardInputError(f"{images.shape[0]} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != images.shape[0]:
        raise RewardInputError(f"{images.shape[0]} images but {len(metadata)} metadata rows")
    if images.numel():
        low, high = float(images.detach().min()), float(images.detach().max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise RewardInputError(
                f"rewards take images in [0, 1]; got values in [{low:.3f}, {high:.3f}] "
                "(a decoded latent in [-1, 1] needs (x + 1) / 2)"
            )


FRAME_REDUCTIONS = ("mean", "min")


def frame_indices(count: int, choice: int | Sequence[int] | None) -> list[int]:
    """The frames of a ``count``-frame video an image reward scores: all (None); ``k`` evenly spaced
    ones, the first and the last among them (k = 1: the middle one); or a list of indices (negative
    ones count from the end)."""
    if choice is None:
        return list(range(count))
    if isinstance(choice, int):
        if not 1 <= choice <= count:
            raise RewardInputError(f"reward frames={choice}: a video of {count} frames has 1 to {count}")
        if choice == 1:
            return [count // 2]
        return torch.linspace(0, count - 1, choice).round().long().tolist()
    index = [i + count if i < 0 else i for i in choice]
    if not index or any(not 0 <= i < count for i in index):
        raise RewardInputError(f"reward frames={list(choice)}: indices must lie in [-{count}, {count}) for {count} frames")
    return index


def reduce_frames(scores: Tensor, how: str) -> Tensor:
    """(B, k) per-frame scores -> (B,): their mean, or their minimum (the worst frame)."""
    if how == "mean":
        return scores.mean(dim=1)
    if how == "min":
        return scores.min(dim=1).values
    raise RewardInputError(f"frame_reduce must be one of {FRAME_REDUCTIONS}, got {how!r}")


class RewardModel:
    """Base of the adapters: ``reward(images, prompts, metadata) -> (scores (B,), sub-scores)``.

    Videos (B, F, 3, H, W) reach an image adapter frame by frame: the frames ``frames`` chooses
    (:func:`frame_indices`) are scored as images with their video's prompt and metadata, and each
    score and sub-score is reduced over them by ``frame_reduce`` (mean or min), gradients included
    where the adapter is differentiable. An adapter that reads whole videos sets ``takes_video``.
    """

    name: ClassVar[str] = "reward"
    differentiable: ClassVar[bool] = True
    takes_video: ClassVar[bool] = False
    # videos: which frames an image adapter scores, and how their scores combine (RewardConfig's)
    frames: int | list[int] | None = None
    frame_reduce: str = "mean"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_config(cls, config: Any, device: str | torch.device = "cpu") -> RewardModel:
        """The adapter a ``RewardConfig`` describes (what ``load_reward`` calls; every registered
        adapter defines it)."""
        raise NotImplementedError(f"{cls.__name__} does not define from_config")

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        """(B,) scores of images (B, 3, H, W) in [0, 1] on ``self.device``; higher is better."""
        raise NotImplementedError

    def score_with_subscores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[
            Tensor, dict[str, Tensor]]:
        """(B,) scores and extra named sub-scores, each (B,), from one pass (default: ``score``, none)."""
        return self.score(images, prompts, metadata), {}

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        check_inputs(images, prompts, metadata)
        if images.ndim == 5 and not self.takes_video:
            return self._score_frames(images, prompts, metadata)
        if images.ndim == 4 and self.takes_video:
            raise RewardInputError(f"reward {self.name} scores videos (B, F, 3, H, W); got images {tuple(images.shape)}")
        grad = torch.is_grad_enabled() and self.differentiable
        with torch.set_grad_enabled(grad):
            scores, extra = self.score_with_subscores(images.to(self.device), list(prompts), metadata)
            # rule-based adapters (the evaluators, OCR, compressibility) count on the host: the
            # contract is scores on the reward's device, so a GPU trainer never mixes devices
            scores = scores.float().to(self.device)
            extra = {name: value.to(self.device) for name, value in extra.items()}
        if scores.shape != (images.shape[0],):
            raise RuntimeError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, "
                               f"expected ({images.shape[0]},)")
        return scores, {self.label: scores, **extra}

    def _score_frames(self, video: Tensor, prompts: Sequence[str], metadata: Metadata) -> tuple[Tensor, dict[str, Tensor]]:
        index = frame_indices(video.shape[1], self.frames)
        batch, k = video.shape[0], len(index)
        frames = video[:, index].flatten(0, 1)  # (B k, 3, H, W), each video's frames together
        rows = None if metadata is None else [row for row in metadata for _ in range(k)]
        scores, extra = self(frames, [p for p in prompts for _ in range(k)], rows)
        return (reduce_frames(scores.view(batch, k), self.frame_reduce),
                {name: reduce_frames(value.view(batch, k), self.frame_reduce) for name, value in extra.items()})

    @property
    def label(self) -> str:
        """The name of this reward's sub-score in logs and reports (the registry name, or more where
        a name alone is ambiguous, e.g. ``hps_v2.1``)."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype})"


def check_options(name: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Unknown adapter options are errors that list the known ones."""
    known = sorted(known)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"reward {name}: unknown option(s) {unknown}; known: {', '.join(known) or 'none'}")


def freeze(module: nn.Module) -> nn.Module:
    """Reward models are never trained: eval mode (no dropout) and no parameter gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


_CACHE: dict[Hashable, Any] = {}


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """Load a reward model once per (kind, weights, device, dtype, ...) key and share it, so that
    e.g. a weighted sum of CLIP score and the aesthetic predictor on the same CLIP loads it once."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


def checkpoint_layers(layers: Iterable[nn.Module]) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them.

    transformers only checkpoints in training mode and reward models stay in eval mode, so the
    layers' ``forward`` is wrapped here instead; it is a no-op when gradients are off.
    """
    for layer in layers:
        if getattr(layer, "_genalign_checkpointed", False):
            continue
        forward = layer.forward

        @functools.wraps(forward)
        def wrapped(*args: Any, __forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(__forward, *args, use_reentrant=False, **kwargs)
            return __forward(*args, **kwargs)

        layer.forward = wrapped  # type: ignore[method-assign]
        layer._genalign_checkpointed = True  # type: ignore[assignment]


def load_checkpoint(file: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True``; a dict
    holding ``state_dict`` (HPS and open_clip checkpoints) is unwrapped."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = load_torch_file(file)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict")
    return dict(state)


class PreferenceMLP(nn.Module):
    """The linear MLP head of the LAION aesthetic predictor v2, reused as is by ImageReward:
    width -> 1024 -> 128 -> 64 -> 16 -> 1, dropout .2, .2, .1 between, no activations. Module for
    module as published, so ``layers.{0,2,4,6,7}`` keys load unchanged."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)
