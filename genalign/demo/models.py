"""The models behind the page: one loaded backbone with every variant's adapter attached by name
(switching a variant is ``set_adapters``, never a reload), rewards loaded once, the shapes world's
gold verdict, and the comparison itself.

A variant is any of: a diffusers-format LoRA (``pytorch_lora_weights.safetensors`` or its folder,
or a run folder with ``final/``), a trainer checkpoint folder (``checkpoints/step-N`` with
``trainable.safetensors``: LoRA weights, or the whole denoiser under full fine-tuning) or a full
fine-tuned denoiser folder (``final/denoiser``). Full denoisers are kept as separate modules and
swapped in as ``backbone.denoiser`` (what the backbone's reference context does).
"""

from __future__ import annotations

import functools
import gc
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genalign.core.config import ConfigError
from genalign.demo.config import BASE, DemoConfig, VariantChoice, check_name

LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_FILE = "trainable.safetensors"
Progress = Callable[[float, str], None]


# --------------------------------------------------------------------------- variants on disk


def locate_variant(path: str | Path) -> tuple[str, Path]:
    """(kind, location) of a variant path: ("lora", file), ("checkpoint", folder) or ("denoiser", folder)."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ConfigError(f"variant {path}: a LoRA file is a .safetensors file")
        return "lora", p
    if not p.is_dir():
        raise ConfigError(f"variant {path} does not exist")
    for folder in (p, p / "final"):  # the weights, or a run folder holding final/
        if (folder / LORA_FILE).is_file():
            return "lora", folder / LORA_FILE
        if (folder / CHECKPOINT_FILE).is_file():
            return "checkpoint", folder
        if (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*.safetensors")):
            return "denoiser", folder
        if (folder / "denoiser" / "config.json").is_file():
            return "denoiser", folder / "denoiser"
    raise ConfigError(f"variant {path}: no {LORA_FILE}, checkpoint ({CHECKPOINT_FILE}) or denoiser folder "
                      "(config.json + diffusion_pytorch_model.safetensors) there or in its final/")


def checkpoint_run_config(folder: Path) -> dict[str, Any]:
    """The ``backbone`` section of the run's config.yaml (run/checkpoints/step-N -> run/config.yaml)."""
    import yaml

    config = folder.parent.parent / "config.yaml"
    if not config.is_file():
        return {}
    return dict((yaml.safe_load(config.read_text()) or {}).get("backbone") or {})


_PEFT_KEY = re.compile(r"\.lora_([AB])\.[^.]+\.weight$")  # x.lora_A.<adapter>.weight


def lora_from_checkpoint(weights: dict[str, Tensor], rank: int, alpha: float) -> dict[str, Tensor]:
    """PEFT-named LoRA weights of a trainer checkpoint -> adapter-free PEFT keys (``x.lora_A.weight``),
    with alpha / rank folded into lora_B: a diffusers LoRA file carries no alpha and loads with
    alpha = rank, so the update B A * alpha / r is kept exactly."""
    scale = alpha / rank
    state = {}
    for key, value in weights.items():
        match = _PEFT_KEY.search(key)
        if match is None:
            continue
        name = _PEFT_KEY.sub(rf".lora_{match[1]}.weight", key)
        state[name] = value * scale if match[1] == "B" and scale != 1.0 else value
    return state


# --------------------------------------------------------------------------- the shapes world's gold verdict


def _normal(prompt: str) -> str:
    return " ".join(prompt.lower().split())


@functools.cache
def _shapes_metadata() -> dict[str, dict[str, Any]]:
    from genalign.shapes.world import all_prompts

    return {_normal(m["prompt"]): m for m in all_prompts()}


def shapes_meta(prompt: str) -> dict[str, Any] | None:
    """GenEval metadata of a shapes-world prompt; None for any other prompt."""
    return _shapes_metadata().get(_normal(prompt))


def gold_verdict(image: Tensor, prompt: str) -> tuple[bool, str] | None:
    """The exact evaluator's (correct, reason) for a shapes prompt's image; None for other prompts."""
    meta = shapes_meta(prompt)
    if meta is None:
        return None
    from genalign.shapes.evaluator import evaluate

    return evaluate(image, meta)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    variant: str
    reno: bool = False

    @property
    def label(self) -> str:
        return f"{self.variant} + ReNO" if self.reno else self.variant


@dataclass
class Settings:
    steps: int = 20
    guidance_scale: float = 5.0
    reno_reward: str | None = None
    reno_steps: int = 4
    reno_iterations: int = 10
    reno_lr: float = 5.0


@dataclass
class Cell:
    row: str
    prompt: str
    seed: int
    image: Tensor  # (3, H, W) in [0, 1]
    scores: dict[str, float | None] = field(default_factory=dict)
    verdict: tuple[bool, str] | None = None

    def caption(self, plain: bool = False) -> str:
        """Scores and verdict in one line; ``plain``: ASCII only (for fonts without ✓ ✗ ·)."""
        parts = [f"{name} {score:.3f}" if score is not None else f"{name} n/a" for name, score in self.scores.items()]
        if self.verdict is not None:
            if plain:
                parts.append("gold ok" if self.verdict[0] else "gold wrong")
            else:
                parts.append("gold ✓" if self.verdict[0] else "gold ✗")
        return (", " if plain else " · ").join(parts)


@dataclass
class Comparison:
    backbone: str
    rows: list[str]
    prompts: list[str]
    seeds: list[int]
    cells: list[Cell]  # row-major over (row, prompt, seed)
    rewards: list[str]
    errors: list[str] = field(default_factory=list)

    def cell(self, row: str, prompt_index: int, seed: int) -> Cell:
        r, s = self.rows.index(row), self.seeds.index(seed)
        return self.cells[(r * len(self.prompts) + prompt_index) * len(self.seeds) + s]

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per row: the mean of each reward and the gold accuracy over shapes prompts."""
        out: dict[str, dict[str, float | None]] = {}
        for row in self.rows:
            cells = [c for c in self.cells if c.row == row]
            means: dict[str, float | None] = {}
            for name in self.rewards:
                values = [v for c in cells if (v := c.scores.get(name)) is not None]
                means[name] = sum(values) / len(values) if values else None
            verdicts = [float(c.verdict[0]) for c in cells if c.verdict is not None]
            means["gold"] = sum(verdicts) / len(verdicts) if verdicts else None
            out[row] = means
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone, "rows": self.rows, "prompts": self.prompts, "seeds": self.seeds,
            "rewards": self.rewards, "errors": self.errors, "summary": self.summary(),
            "cells": [{"row": c.row, "prompt": c.prompt, "seed": c.seed, "scores": c.scores,
                       "gold": None if c.verdict is None else {"correct": c.verdict[0], "reason": c.verdict[1]}}
                      for c in self.cells],
        }


# --------------------------------------------------------------------------- the bank


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelBank:
    """Loads lazily and keeps: the selected backbone (one at a time), its adapters, the rewards.
    Calls are serialised by one lock (adapters are switched on a shared module)."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.device = pick_device(config.device)
        self.backbones = {b.name: b for b in config.backbones}
        self.variants: dict[str, VariantChoice] = {v.name: v for v in config.variants}
        self.rewards = {r.name: r for r in config.rewards}
        self.lock = threading.RLock()
        self._backbone_name: str | None = None
        self._backbone: Any = None
        self._adapters: dict[str, str] = {}  # variant -> adapter name inside the loaded pipeline
        self._denoisers: dict[str, nn.Module] = {}
        self._reward_models: dict[str, Any] = {}

    # ------------------------------------------------------------------ catalogue

    def add_variant(self, name: str, path: Path) -> VariantChoice:
        """A variant typed in the page (its path already checked against the allowed folders)."""
        check_name(name, "variant")
        with self.lock:
            if name == BASE or name in self.variants:
                raise ConfigError(f"a variant named {name!r} exists already")
            locate_variant(path)
            self.variants[name] = VariantChoice(name, str(path))
            return self.variants[name]

    # ------------------------------------------------------------------ loading

    def backbone(self, name: str) -> Any:
        from genalign.core.experiment import BackboneConfig
        from genalign.pipelines import load_backbone

        with self.lock:
            if name not in self.backbones:
                raise ConfigError(f"unknown backbone {name!r}; configured: {', '.join(self.backbones)}")
            if self._backbone_name != name:
                self._backbone, self._backbone_name = None, None
                self._adapters.clear()
                self._denoisers.clear()
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                choice = self.backbones[name]
                config = BackboneConfig(family=choice.family, path=choice.path, finetune="none",
                                        dtype=self.config.dtype)  # type: ignore[arg-type]  # checked by argparse
                self._backbone = load_backbone(config, self.device)
                self._backbone_name = name
            return self._backbone

    def reward(self, name: str) -> Any:
        from genalign.core.experiment import RewardConfig
        from genalign.rewards import load_reward

        with self.lock:
            if name not in self.rewards:
                raise ConfigError(f"unknown reward {name!r}; configured: {', '.join(self.rewards) or 'none'}")
            if name not in self._reward_models:
                choice = self.rewards[name]
                self._reward_models[name] = load_reward(RewardConfig(name=choice.name, path=choice.path), self.device)
            return self._reward_models[name]

    def _attach(self, variant: str) -> tuple[str, Any]:
        """Load a variant into the current backbone once: ("adapter", name) or ("denoiser", module)."""
        if variant in self._adapters:
            return "adapter", self._adapters[variant]
        if variant in self._denoisers:
            return "denoiser", self._denoisers[variant]
        if variant not in self.variants:
            raise ConfigError(f"unknown variant {variant!r}")
        backbone = self._backbone
        kind, location = locate_variant(self.variants[variant].path)
        if kind == "denoiser":
            module = type(backbone.unwrapped_denoiser).from_pretrained(str(location), torch_dtype=backbone.dtype)
            self._denoisers[variant] = module.to(backbone.device).eval().requires_grad_(False)
            return "denoiser", self._denoisers[variant]
        source: Any = str(location)
        if kind == "checkpoint":
            from safetensors.torch import load_file

            weights = load_file(str(location / CHECKPOINT_FILE))
            run = checkpoint_run_config(location)
            rank = int(run.get("lora_rank", 1))
            state = lora_from_checkpoint(weights, rank, float(run.get("lora_alpha", rank)))
            if not state:  # full fine-tuning: the checkpoint holds the denoiser's parameters
                # a fresh module of the same architecture (the loaded one may carry adapters by now)
                module = type(backbone.unwrapped_denoiser).from_config(backbone.unwrapped_denoiser.config)
                expected = set(module.state_dict())
                if set(weights) != expected:
                    odd = sorted(set(weights) ^ expected)[:3]
                    raise ConfigError(f"checkpoint {location} does not fit backbone {self._backbone_name!r}'s "
                                      f"denoiser (e.g. {odd})")
                module.load_state_dict(weights)
                if backbone.dtype != torch.float32:
                    module.to(dtype=backbone.dtype)
                self._denoisers[variant] = module.to(backbone.device).eval().requires_grad_(False)
                return "denoiser", self._denoisers[variant]
            if backbone.lora_keys_to_diffusers:
                from diffusers.utils import convert_state_dict_to_diffusers

                state = convert_state_dict_to_diffusers(state)
            prefix = "unet" if backbone.lora_layers_kwarg == "unet_lora_layers" else "transformer"
            source = {f"{prefix}.{k}": v for k, v in state.items()}
        adapter = f"variant_{len(self._adapters)}"
        try:
            backbone.pipe.load_lora_weights(source, adapter_name=adapter)
        except Exception as err:
            raise ConfigError(f"variant {variant!r} ({self.variants[variant].path}) does not load into backbone "
                              f"{self._backbone_name!r}: {err}") from err
        backbone.pipe.to(backbone.device)
        loaded = {name for names in backbone.pipe.get_list_adapters().values() for name in names}
        if adapter not in loaded:  # diffusers skips weights that match no module, with only a warning
            raise ConfigError(f"variant {variant!r} ({self.variants[variant].path}) does not fit backbone "
                              f"{self._backbone_name!r}: none of its LoRA weights match the model (another family?)")
        self._adapters[variant] = adapter
        return "adapter", adapter

    @contextmanager
    def using(self, variant: str) -> Iterator[Any]:
        """The current backbone with exactly ``variant`` active (``base``: no adapter)."""
        with self.lock:
            backbone = self._backbone
            if backbone is None:
                raise RuntimeError("select a backbone first")
            kind, handle = ("base", None) if variant == BASE else self._attach(variant)
            pipe = backbone.pipe
            if kind == "adapter":
                pipe.enable_lora()
                pipe.set_adapters([handle])
            elif self._adapters:
                pipe.disable_lora()
            if kind == "denoiser":
                backbone.denoiser = handle
            try:
                yield backbone
            finally:
                backbone.denoiser = backbone.unwrapped_denoiser

    # ------------------------------------------------------------------ generating and scoring

    def generate(self, row: Row, prompts: list[str], seeds: list[int], settings: Settings) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] of ``row`` for prompt i from the noise of ``seeds[i]``: the
        same noise for every row, so a column differs only by the model."""
        from genalign.core.rollout import draw_noise
        from genalign.eval.generate import backbone_sampler

        with self.using(row.variant) as backbone:
            if not row.reno:
                return backbone_sampler(backbone, settings.steps, settings.guidance_scale)(prompts, seeds)
            from genalign.finetuners.reno import RenoConfig, reno

            if not settings.reno_reward:
                raise ConfigError("ReNO needs a reward: configure one with --reward and pick it as the ReNO reward")
            reward = self.reward(settings.reno_reward)
            noise = draw_noise(backbone, len(seeds), seeds=seeds)
            config = RenoConfig(num_steps=settings.reno_steps, guidance_scale=settings.guidance_scale,
                                iterations=settings.reno_iterations, lr=settings.reno_lr)
            return reno(backbone, reward, prompts, config, noise=noise).images.float().cpu()

    def score(
        self, images: Tensor, prompts: list[str], rewards: Sequence[str]
    ) -> tuple[dict[str, list[float | None]], list[str]]:
        """Per reward, one score per image (None where the reward failed), and the failures."""
        metas = [shapes_meta(p) for p in prompts]
        metadata = metas if all(m is not None for m in metas) else None
        scores: dict[str, list[float | None]] = {}
        errors = []
        for name in rewards:
            try:
                with torch.no_grad():
                    values, _ = self.reward(name)(images.to(self.device), prompts, metadata)
                scores[name] = [float(v) for v in values.float().cpu()]
            except Exception as err:  # one broken reward must not hide the images
                scores[name] = [None] * len(prompts)
                errors.append(f"reward {name}: {type(err).__name__}: {err}")
        return scores, errors

    def compare(
        self,
        backbone: str,
        rows: Sequence[Row],
        prompts: Sequence[str],
        seeds: Sequence[int],
        rewards: Sequence[str],
        settings: Settings,
        progress: Progress | None = None,
    ) -> Comparison:
        """Every row on every (prompt, seed), scored by ``rewards`` and, for shapes prompts, the
        exact evaluator."""
        prompts, seeds, rows = list(prompts), list(seeds), list(rows)
        if not rows:
            raise ValueError("pick at least one variant")
        total = len(rows) * len(prompts) * len(seeds)
        if total > self.config.max_images:
            raise ValueError(f"{total} images asked for (rows x prompts x seeds); this demo allows "
                             f"{self.config.max_images} a click (--max-images)")
        jobs = [(p, s) for p in prompts for s in seeds]
        batch = self.config.batch_size
        cells: list[Cell] = []
        errors: list[str] = []
        with self.lock:
            self.backbone(backbone)
            done = 0
            for row in rows:
                for start in range(0, len(jobs), batch):
                    chunk = jobs[start : start + batch]
                    if progress is not None:
                        progress(done / total, f"{row.label}: images {start + 1}-{start + len(chunk)} of {len(jobs)}")
                    chunk_prompts, chunk_seeds = [p for p, _ in chunk], [s for _, s in chunk]
                    images = self.generate(row, chunk_prompts, chunk_seeds, settings).float().cpu().clamp(0, 1)
                    scores, failed = self.score(images, chunk_prompts, rewards)
                    errors += [e for e in failed if e not in errors]
                    for i, (prompt, seed) in enumerate(chunk):
                        verdict = None
                        try:
                            verdict = gold_verdict(images[i], prompt)
                        except Exception as err:  # the evaluator refuses odd image sizes
                            message = f"gold verdict: {type(err).__name__}: {err}"
                            if message not in errors:
                                errors.append(message)
                        cells.append(Cell(row.label, prompt, seed, images[i],
                                          {name: scores[name][i] for name in rewards}, verdict))
                    done += len(chunk)
        return Comparison(backbone, [r.label for r in rows], prompts, seeds, cells, list(rewards), errors)
