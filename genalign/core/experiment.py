"""The experiment config: backbone + reward(s) + method + sampling + run, one YAML file.

```yaml
backbone: {family: sd, path: runwayml/stable-diffusion-v1-5, dtype: bfloat16}
reward: {name: pickscore}            # or a list of {name, weight} for a weighted sum
method: {name: diffusion_dpo, beta: 5000}
sample: {num_steps: 20, guidance_scale: 5.0}
run: {steps: 2000, lr: 1e-5, mixed_precision: bf16}
```

Overrides: ``genalign train x.yaml method.beta=2500 run.steps=200``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from genalign.core.config import (
    ConfigError,
    OverrideValue,
    apply_overrides,
    check,
    field,
    from_dict,
    read_yaml,
    to_dict,
)


@dataclass
class BackboneConfig:
    family: str = field("sd", help="model family: sd (1.x/2.x), sdxl, sd-turbo, sdxl-turbo, sd3, flux, flux-kontext, flux2, flux2-klein, qwenimage, qwenimage-edit, qwenimage-edit-plus, zimage, wan, wan-i2v")
    path: str = field("", help="diffusers checkpoint: a hub id or a local folder")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="weights dtype of the frozen parts")
    revision: str | None = field(None, help="hub revision (branch, tag or commit)")
    variant: str | None = field(None, help="weights variant, e.g. fp16")
    finetune: Literal["lora", "full", "none"] = field("lora", help="what is trained in the denoiser")
    lora_rank: int = field(4, help="LoRA rank r (usual 4-64)")
    lora_alpha: float = field(4.0, help="LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = field(0.0, help="dropout on the LoRA input")
    lora_targets: list[str] = field(
        default_factory=list, help="module names that get LoRA; empty = the family's attention projections"
    )
    gradient_checkpointing: bool = field(False, help="recompute denoiser activations in backward (less memory)")
    attention: Literal["sdpa", "xformers"] = field("sdpa", help="attention kernel; xformers needs CUDA")
    resolution: int | None = field(None, help="image size in pixels; default: the model's native size")
    timestep_spacing: str | None = field(None, help="override the scheduler's spacing (leading/trailing/linspace)")
    drop_t5: bool = field(False, help="SD3: load without the T5-XXL text encoder (about 10 GB less; weaker prompts)")
    max_sequence_length: int | None = field(
        None, help="T5 tokens of SD3/FLUX prompts; default: the checkpoint's genalign.json, else diffusers' (256/512)"
    )
    source_images: str | None = field(
        None, help="editing models: JSONL rows {prompt, source_image: image file (relative to the JSONL)}, the "
                   "image each instruction edits"
    )
    frames: int | None = field(
        None, help="video models: frames a video in rollouts and samples (Wan: 4k + 1); default: the checkpoint's "
                   "genalign.json, else the pipeline's (Wan: 81)"
    )
    vae_tiling: bool = field(False, help="decode (and encode) in overlapping tiles: less memory for large images "
                                        "and videos, e.g. decoding inside the reward (gradients still flow)")
    vae_slicing: bool = field(False, help="decode a batch one sample at a time (less memory)")
    compile: Literal["none", "sampling", "all"] = field(
        "none", help="torch.compile the denoiser (inductor) for its forwards without gradient (sampling: rollouts, "
                     "grids, evaluation) or for every forward and backward (all); a one-off compile of minutes, "
                     "seconds from inductor's cache; eager with a warning where the device cannot compile"
    )
    merge_lora: bool = field(
        True, help="sampling without gradient (rollouts, grids, evaluation) uses the LoRA merged into a copy of the "
                   "weights it wraps, one matrix product a layer instead of three, where they compute in full fp32 "
                   "(bf16, fp16 or TF32 would round small updates away); the wrapped weights come back unchanged"
    )
    compile_warmup: int = field(
        16, help="backbone.compile: calls of a kind (input shape, gradient, reference) run eagerly before it is "
                 "compiled (a one-off sample grid is not worth a compile; 0: compile from the first call)")
    expert: Literal["high", "low"] | None = field(
        None, help="Wan 2.2 A14B: the expert trained (high: the high-noise transformer, low: transformer_2); the "
                   "other stays frozen; default high"
    )

    def __post_init__(self) -> None:
        check(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.frames is None or self.frames >= 1, f"frames must be >= 1, got {self.frames}")
        check(self.compile_warmup >= 0, f"compile_warmup must be >= 0, got {self.compile_warmup}")


@dataclass
class RewardConfig:
    name: str = field(help="registered reward name, e.g. clip, aesthetic, pickscore")
    weight: float = field(1.0, help="weight in a weighted sum of rewards")
    path: str | None = field(None, help="weights: hub id or local path (default: the published ones)")
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", help="dtype of the reward model's weights (preprocessing and scores stay fp32)"
    )
    gradient_checkpointing: bool = field(
        False, help="recompute the reward model's activations in backward (differentiable rewards)"
    )
    options: dict[str, Any] = field(default_factory=dict, help="adapter-specific options")
    frames: int | list[int] | None = field(
        None, help="videos: the frames an image reward scores: k (evenly spaced, first and last included) or a "
                   "list of indices (negative from the end); default every frame"
    )
    frame_reduce: Literal["mean", "min"] = field("mean", help="videos: an image reward's frame scores combined "
                                                              "by their mean or their minimum (the worst frame)")


@dataclass
class SampleConfig:
    num_steps: int = field(20, help="denoising steps for rollouts and sample grids (turbo: 1-4)")
    guidance_scale: float = field(5.0, help="classifier-free guidance scale (1 = off)")
    eta: float = field(0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like; rollouts of RL methods use 1")
    sde: Literal["default", "cps", "cps_gaussian"] = field(
        "default", help="flow models' stochastic step: default (Flow-GRPO's SDE, noise level eta), cps "
                        "(coefficients-preserving sampling, Wang and Yu 2025, with the official surrogate "
                        "log-prob -||x - mean||^2; flow_grpo's fast configs: eta 0.8) or cps_gaussian (CPS "
                        "with the step's true log-density: keep its stochastic steps away from the last sigmas)")
    negative_prompt: str = field("", help="negative prompt for classifier-free guidance")
    prompts: list[str] = field(default_factory=list, help="prompts of the periodic sample grids")

    def __post_init__(self) -> None:
        check(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        check(self.eta >= 0, f"eta must be >= 0, got {self.eta}")


@dataclass
class RunConfig:
    output_dir: str = field("runs/default", help="run directory: config, logs, checkpoints, samples")
    seed: int = field(0, help="seed of everything; a resumed run continues the same random streams")
    steps: int = field(100, help="optimizer steps")
    batch_size: int = field(4, help="prompts per micro-batch per process")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    prompts: list[str] = field(default_factory=list, help="training prompts (cycled, reshuffled each epoch)")
    prompt_file: str | None = field(None, help="text file with one training prompt a line")
    lr: float = field(1e-4, help="peak learning rate")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = field(
        "constant", help="learning-rate schedule (diffusers.optimization.get_scheduler)"
    )
    warmup_steps: int = field(0, help="linear warm-up steps")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    adam_betas: tuple[float, float] = field((0.9, 0.999), help="AdamW betas")
    adam_eps: float = field(1e-8, help="AdamW epsilon")
    fused_adamw: bool = field(True, help="AdamW's fused kernel (one update for all parameters) where the device "
                                         "has one (CUDA, CPU, MPS ...); false: torch's default (foreach / for-loop)")
    tf32: bool = field(True, help="TF32 matmuls and convolutions for fp32 work on CUDA GPUs (Ampere and later; no "
                                  "effect elsewhere); false: full fp32")
    max_grad_norm: float = field(1.0, help="gradient clipping by global norm; 0 disables")
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        "no", help="autocast precision (fp16 needs a GPU; bf16 also speeds up CPUs with AMX / AVX-512 bf16)"
    )
    threads: int = field(0, help="torch CPU threads of each process; 0: OMP_NUM_THREADS when set, else the cores "
                                 "this process may use divided by the launch's processes on this machine")
    ema: bool = field(False, help="keep an exponential moving average of the trained weights")
    ema_decay: float = field(
        0.999, help="EMA decay; diffusers' EMAModel ramps it up as min(decay, (1 + s) / (10 + s)) at step s"
    )
    tracker: Literal["tensorboard", "wandb", "none"] = field("tensorboard", help="accelerate tracker")
    log_every: int = field(1, help="log metrics every N steps")
    sample_every: int = field(0, help="write a sample grid every N steps (0: only at the end)")
    checkpoint_every: int = field(50, help="save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = field(3, help="how many most recent checkpoints to keep")
    export_every: int = field(
        0, help="also export the weights every N steps to exports/step-N/ (learning curves; with a constant "
                "learning rate each is the run stopped there); 0: only final/")
    nan_tolerance: int = field(0, help="non-finite steps in a row that are skipped before the run stops")
    max_minutes: float = field(
        0.0, help="stop after this many minutes of training (export.json's clock: exports and checkpoints not "
                  "counted; a resumed run counts its earlier launches), saving and exporting as at the end "
                  "(0: no limit; the learning-rate schedule still spans all the configured steps)")
    max_cpu_minutes: float = field(
        0.0, help="the same in CPU minutes: this process's CPU time over all its threads (export.json's "
                  "train_cpu_seconds), which other work on a shared machine does not use up; 0: no limit")

    def __post_init__(self) -> None:
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        check(self.threads >= 0, f"threads must be >= 0 (0: automatic), got {self.threads}")
        check(0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        check(self.nan_tolerance >= 0, f"nan_tolerance must be >= 0, got {self.nan_tolerance}")
        for name in ("log_every", "sample_every", "checkpoint_every", "export_every", "warmup_steps", "max_minutes",
                     "max_cpu_minutes"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")

    def load_prompts(self) -> list[str]:
        empty = [i for i, p in enumerate(self.prompts) if not str(p).strip()]
        if empty:
            raise ConfigError(f"run.prompts[{empty[0]}] is empty: give every training prompt some text")
        prompts = list(self.prompts)
        if self.prompt_file:
            path = Path(self.prompt_file)
            if not path.is_file():
                raise ConfigError(f"run.prompt_file: file not found: {path}")
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError("no training prompts: set run.prompts or run.prompt_file")
        return prompts


@dataclass
class ExperimentConfig:
    backbone: BackboneConfig
    reward: list[RewardConfig]
    method_name: str
    method: Any
    sample: SampleConfig
    run: RunConfig

    def to_dict(self) -> dict[str, Any]:
        method = {"name": self.method_name, **(to_dict(self.method) if self.method is not None else {})}
        return {
            "backbone": to_dict(self.backbone),
            "reward": to_dict(self.reward),
            "method": method,
            "sample": to_dict(self.sample),
            "run": to_dict(self.run),
        }


SECTIONS = ("backbone", "reward", "method", "sample", "run")


def build_experiment(data: Mapping[str, Any], methods: Mapping[str, type], source: str) -> ExperimentConfig:
    """Check and build an :class:`ExperimentConfig` from a plain mapping."""
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(map(repr, unknown))}; sections: {', '.join(SECTIONS)}")
    if not isinstance(data.get("method") or {}, Mapping):
        raise ConfigError(f"{source}: 'method' must be a mapping with a 'name', got {data.get('method')!r}")
    method_data = dict(data.get("method") or {})
    method_name = method_data.pop("name", None)
    if isinstance(method_name, OverrideValue):
        method_name = method_name.raw
    if method_name is None:
        raise ConfigError(f"{source}: 'method.name' is required; available: {', '.join(sorted(methods)) or 'none'}")
    if method_name not in methods:
        raise ConfigError(
            f"{source}: unknown method.name {method_name!r}; available: {', '.join(sorted(methods)) or 'none'}"
        )
    rewards = data.get("reward") or []
    if isinstance(rewards, Mapping):
        rewards = [rewards]
    if not isinstance(rewards, list):
        raise ConfigError(f"{source}: 'reward' must be a mapping or a list of mappings")
    return ExperimentConfig(
        backbone=from_dict(BackboneConfig, data.get("backbone"), source, "backbone."),
        reward=[from_dict(RewardConfig, r, source, f"reward[{i}].") for i, r in enumerate(rewards)],
        method_name=method_name,
        method=from_dict(methods[method_name], method_data, source, "method."),
        sample=from_dict(SampleConfig, data.get("sample"), source, "sample."),
        run=from_dict(RunConfig, data.get("run"), source, "run."),
    )


def load_experiment(
    path: str | Path, methods: Mapping[str, type], overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Load a YAML experiment and apply dotted overrides; ``methods`` maps method names to Configs.

    The file is checked on its own first, so an error in it names the file; an error that only
    appears after the overrides names the command line.
    """
    data = read_yaml(path)
    config = build_experiment(data, methods, str(path))
    if overrides:
        config = build_experiment(apply_overrides(data, overrides), methods, f"command line ({' '.join(overrides)})")
    return config
