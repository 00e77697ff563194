"""What the demo serves: backbones, variants, rewards, the pairs to label, and the folders the
page may touch (:class:`AllowedRoots`). Plain dataclasses and path checks; no gradio, no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from genalign.core.config import ConfigError

BASE = "base"  # the variant name of the backbone without adapters
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


class PathNotAllowed(ValueError):
    """A path typed in the page that resolves outside the folders the demo was started with."""


def check_name(name: str, what: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"{what} name {name!r}: use letters, digits and _ . + - (at most 64 characters)")
    return name


def split_named(spec: str, what: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); a bare ``VALUE`` -> (None, VALUE)."""
    if "=" in spec:
        name, value = spec.split("=", 1)
        if not value:
            raise ConfigError(f"{what} {spec!r}: nothing after '='")
        return check_name(name, what), value
    return None, spec


@dataclass(frozen=True)
class BackboneChoice:
    name: str  # shown in the page's backbone menu
    path: str  # hub id or local diffusers folder
    family: str  # genalign.pipelines.BACKBONES key


@dataclass(frozen=True)
class VariantChoice:
    name: str  # the row label
    path: str  # a LoRA file/folder, a run folder, a checkpoint folder or a full denoiser folder


@dataclass(frozen=True)
class RewardChoice:
    name: str  # registered reward name (genalign.rewards), also the label in the page
    path: str | None  # weights; None: the adapter's published default


@dataclass
class DemoConfig:
    """Everything ``genalign demo`` serves. Paths are as given (relative to the working directory)."""

    backbones: list[BackboneChoice]
    variants: list[VariantChoice] = field(default_factory=list)
    rewards: list[RewardChoice] = field(default_factory=list)
    pairs_dir: str | None = None  # a folder written by `genalign d3po sample`
    labels: str | None = None  # labels JSONL; default <pairs_dir>/labels.jsonl
    prompt_file: str | None = None  # the gallery's default prompt list
    out_dir: str = "runs/demo"  # downloads: grids and scores
    allow_roots: list[str] = field(default_factory=list)  # more folders the page may read
    device: str = "auto"
    dtype: str = "float32"
    steps: int = 20
    guidance_scale: float = 5.0
    batch_size: int = 8
    reno_steps: int = 4
    reno_iterations: int = 10
    reno_lr: float = 5.0
    max_images: int = 256  # per click: prompts x seeds x rows
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False  # a public gradio.live link: only when asked for

    def __post_init__(self) -> None:
        if not self.backbones:
            raise ConfigError("the demo needs at least one --backbone")
        for what, names in (("backbone", [b.name for b in self.backbones]),
                            ("variant", [BASE] + [v.name for v in self.variants]),
                            ("reward", [r.name for r in self.rewards])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ConfigError(f"{what} names must be unique ({BASE!r} is the backbone itself): {repeated}")
        if self.steps < 1 or self.reno_steps < 1 or self.batch_size < 1 or self.max_images < 1:
            raise ConfigError("steps, reno_steps, batch_size and max_images must be >= 1")
        if self.reno_iterations < 1:
            raise ConfigError("reno_iterations (reward evaluations, the first on the starting noise) must be >= 1")

    @property
    def labels_path(self) -> Path | None:
        if self.labels:
            return Path(self.labels)
        return Path(self.pairs_dir) / "labels.jsonl" if self.pairs_dir else None

    def roots(self) -> AllowedRoots:
        """The folders the page may read: every configured local path (a file's folder) and --allow-root."""
        paths: list[str] = [*self.allow_roots, self.out_dir]
        paths += [b.path for b in self.backbones if Path(b.path).exists()]
        paths += [v.path for v in self.variants]
        paths += [r.path for r in self.rewards if r.path and Path(r.path).exists()]
        if self.pairs_dir:
            paths.append(self.pairs_dir)
        if self.labels_path is not None:
            paths.append(str(self.labels_path.parent))
        if self.prompt_file:
            paths.append(str(Path(self.prompt_file).parent))
        return AllowedRoots(paths)


class AllowedRoots:
    """Folders a path typed in the page must resolve into (symlinks and ``..`` resolved first)."""

    def __init__(self, roots: Iterable[str | Path]):
        resolved = []
        for root in roots:
            path = Path(root).resolve()
            resolved.append(path if path.is_dir() or not path.exists() else path.parent)
        self.roots = sorted(set(resolved))

    def check(self, text: str | Path, what: str = "path") -> Path:
        """The resolved path, or :class:`PathNotAllowed` naming the allowed folders."""
        raw = str(text).strip()
        if not raw:
            raise PathNotAllowed(f"{what}: empty path")
        if "\x00" in raw:
            raise PathNotAllowed(f"{what}: invalid path")
        if raw.startswith(("http://", "https://", "hf://")) or "://" in raw:
            raise PathNotAllowed(f"{what}: only local paths inside the configured folders are accepted, not URLs")
        path = Path(raw).expanduser().resolve()
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(r) for r in self.roots) or "none"
            raise PathNotAllowed(f"{what} {raw!r} is outside the folders this demo was started with ({allowed}); "
                                 "restart it with --allow-root to add one")
        return path


def detect_family(path: str, default: str = "sd") -> str:
    """The family of a local diffusers folder from its model_index.json; ``default`` otherwise."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return default
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError):
        return default
    from genalign.pipelines import family_of_pipeline  # each backbone says which pipeline class is its own

    return family_of_pipeline(name) or default


def parse_backbones(specs: Sequence[str], families: Sequence[str]) -> list[BackboneChoice]:
    """``--backbone [NAME=]PATH`` (repeatable) with ``--family`` once for all or once per backbone
    (``auto``: from the folder's model_index.json)."""
    if families and len(families) not in (1, len(specs)):
        raise ConfigError(f"give --family once (for every backbone) or once per --backbone; got {len(families)} "
                          f"for {len(specs)} backbones")
    choices = []
    for i, spec in enumerate(specs):
        name, path = split_named(spec, "--backbone")
        family = (families[i] if len(families) > 1 else families[0]) if families else "auto"
        if family == "auto":
            family = detect_family(path)
        choices.append(BackboneChoice(name or Path(path.rstrip("/")).name or path, path, family))
    return choices


def parse_variants(specs: Sequence[str]) -> list[VariantChoice]:
    """``--variant NAME=PATH`` (repeatable); the path must exist."""
    out = []
    for spec in specs:
        name, path = split_named(spec, "--variant")
        if name is None:
            name = check_name(variant_default_name(path), "--variant")
        if not Path(path).exists():
            raise ConfigError(f"--variant {spec!r}: {path} does not exist")
        out.append(VariantChoice(name, path))
    return out


def variant_default_name(path: str) -> str:
    """runs/dpo/final -> dpo; runs/dpo/checkpoints/step-000100 -> dpo@000100; a.safetensors -> a."""
    p = Path(path.rstrip("/"))
    if p.name == "pytorch_lora_weights.safetensors":
        p = p.parent
    if p.name == "final":
        return p.parent.name
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}@{p.name.removeprefix('step-')}"
    return p.stem


def parse_rewards(specs: Sequence[str]) -> list[RewardChoice]:
    """``--reward NAME[=PATH]`` (repeatable): a registered reward and its weights."""
    out = []
    for spec in specs:
        name, value = split_named(spec, "--reward")
        out.append(RewardChoice(name, value) if name is not None else RewardChoice(check_name(value, "--reward"), None))
    return out


def parse_seeds(text: str, limit: int = 64) -> list[int]:
    """``"0, 1, 5-7"`` -> [0, 1, 5, 6, 7] (order kept, repeats dropped)."""
    seeds: list[int] = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"seeds: {part!r} is not a number or a range like 3-7")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low or high - low >= limit:
            raise ValueError(f"seeds: bad range {part!r}")
        seeds += [s for s in range(low, high + 1) if s not in seeds]
    if not seeds:
        raise ValueError("seeds: give at least one seed, e.g. 0, 1, 2")
    if len(seeds) > limit:
        raise ValueError(f"seeds: at most {limit} at a time, got {len(seeds)}")
    return seeds


def parse_prompts(text: str, limit: int) -> list[str]:
    """One prompt a line (blank lines and ``#`` comments skipped)."""
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError("enter at least one prompt (one a line)")
    if len(prompts) > limit:
        raise ValueError(f"at most {limit} prompts at a time, got {len(prompts)}")
    return prompts
