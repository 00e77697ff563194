"""What every diffusers-backed backbone shares: loading, freezing, LoRA, reference, precision.

A family adapter (sd.py, sdxl.py, ...) subclasses :class:`DiffusersBackbone` and supplies the
pipeline class, prompt encoding and the denoiser call; everything else is here once.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from genalign.core.experiment import BackboneConfig
from genalign.core.images import check_images, read_source_images
from genalign.core.loading import WeightsNotFoundError, from_pretrained_or_explain
from genalign.core.schedules import DiffusionSchedule, NoiseSchedule
from genalign.core.speed import WARMUP, CompiledDenoiser, compile_unavailable
from genalign.core.types import Conditioning

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _reduced_fp32(device: str) -> bool:
    """Whether fp32 matrix products or convolutions on ``device`` run through a lower precision:
    TF32 on CUDA (``run.tf32``), bf16 / TF32 in oneDNN on CPUs (``set_float32_matmul_precision
    ("medium")``, ``torch.backends.mkldnn``'s ``fp32_precision``)."""
    if device == "cuda":
        return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    mkldnn = torch.backends.mkldnn
    settings = (getattr(torch.backends, "fp32_precision", "none"), getattr(mkldnn, "fp32_precision", "none"),
                getattr(getattr(mkldnn, "matmul", None), "fp32_precision", "none"),
                getattr(getattr(mkldnn, "conv", None), "fp32_precision", "none"))
    return any(setting in ("bf16", "tf32") for setting in settings)


class _TruncationFilter(logging.Filter):
    """diffusers warns about a truncated prompt at every encode; the backbone reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "truncated because" not in record.getMessage()


def _silence_diffusers_truncation_warnings() -> None:
    from diffusers.utils import logging as diffusers_logging

    root = diffusers_logging.get_logger("diffusers")  # the library's root logger, with its handler
    for target in (root, *root.handlers):
        if not any(isinstance(f, _TruncationFilter) for f in target.filters):
            target.addFilter(_TruncationFilter())


_silence_diffusers_truncation_warnings()


def absent_components(path: str) -> set[str]:
    """Components a local diffusers folder saved as null in model_index.json (e.g. SD3 without T5)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return set()
    return {k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is None}


def checkpoint_defaults(path: str) -> dict[str, Any]:
    """Settings a local checkpoint folder records for genalign in ``genalign.json`` (e.g. the shapes
    world's SD3 model, trained with a 1-token T5 part); empty for anything else."""
    file = Path(path) / "genalign.json"
    return json.loads(file.read_text()) if path and file.is_file() else {}


class DiffusersBackbone:
    """Backbone contract over a diffusers pipeline (see ``genalign.core.types.Backbone``)."""

    pipeline_class: ClassVar[type]
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_layers_kwarg: ClassVar[str] = "unet_lora_layers"  # the save_lora_weights argument
    # UNet LoRAs are saved in diffusers' key format, transformer LoRAs in PEFT's, as diffusers'
    # own DreamBooth-LoRA scripts save them (train_dreambooth_lora_sdxl.py vs _sd3.py / _flux.py).
    lora_keys_to_diffusers: ClassVar[bool] = True
    default_timestep_spacing: ClassVar[str | None] = None  # turbo variants force "trailing"
    # a folder whose model_index.json names pipeline_class is this family unless told otherwise
    # (False where several families share the class: the turbo variants need --family)
    detected_from_pipeline: ClassVar[bool] = True
    # the pipeline's T5 tokenizers: they read max_sequence_length tokens, CLIP's their model_max_length
    t5_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer_3",)
    denoiser_component: ClassVar[str] = "unet"  # the pipeline's component that is trained
    # prompt tokens read when neither the config nor the checkpoint's genalign.json says (None: the tokenizer's)
    default_sequence_length: ClassVar[int | None] = None
    # editing models (FLUX.1 Kontext, Qwen-Image-Edit): prompts are instructions on a source image
    takes_images: ClassVar[bool] = False
    # video models (Wan): latents (B, C, f, h, w), decode -> (B, F, 3, H, W)
    video: ClassVar[bool] = False
    latent_patch: ClassVar[int] = 1  # latents packed p x p into one token outside the denoiser (FLUX-style: 2)

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        """``genalign tiny`` names -> ``(prediction_type, seed) -> pipeline``: tiny random models of
        this family built from configs with the real classes (``pipelines/tiny.py``), for tests."""
        return {}

    def __init__(self, pipe: Any, config: BackboneConfig, device: str | torch.device = "cpu"):
        self.pipe = pipe
        self.config = config
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        pipe.to(self.device)
        self._freeze_all()
        self._upcast_vae_if_needed()
        self.defaults = checkpoint_defaults(config.path)
        self.schedule: NoiseSchedule = self._make_schedule()
        self._reference_copy: nn.Module | None = None
        self.denoiser: nn.Module = self.unwrapped_denoiser
        if config.attention == "xformers":
            self._enable_xformers()
        for lever in ("tiling", "slicing"):
            if getattr(config, f"vae_{lever}"):
                enable = getattr(self.pipe.vae, f"enable_{lever}", None)
                if enable is None:
                    raise ValueError(f"backbone.vae_{lever}: {type(self.pipe.vae).__name__} has no {lever}")
                enable()
        if config.finetune == "lora":
            self.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets or None, config.lora_dropout)
        elif config.finetune == "full":
            self.unwrapped_denoiser.requires_grad_(True)
            if self.dtype != torch.float32:  # trained weights live in fp32 (autocast does the rest)
                self.unwrapped_denoiser.to(torch.float32)
        if config.gradient_checkpointing:
            self.unwrapped_denoiser.enable_gradient_checkpointing()
        if config.compile != "none":
            self.compile_denoiser(config.compile, config.compile_warmup)
        if config.frames is not None and not self.video:
            raise ValueError(f"backbone.frames: {config.family} makes images, not videos")
        self.source_images: dict[str, Tensor] = {}
        if config.source_images:
            if not self.takes_images:
                raise ValueError(f"backbone.source_images: {config.family} is a text-to-image model, not an editing one")
            self.set_source_images(read_source_images(config.source_images))

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, config: BackboneConfig, device: str | torch.device = "cpu") -> DiffusersBackbone:
        if not config.path:
            raise WeightsNotFoundError("backbone.path is empty: give a hub id or a local diffusers folder")
        kwargs: dict[str, Any] = {"dtype": DTYPES[config.dtype]}
        if config.revision:
            kwargs["revision"] = config.revision
        if config.variant:
            kwargs["variant"] = config.variant
        kwargs.update(cls.extra_load_kwargs(config))
        pipe = from_pretrained_or_explain(
            cls.pipeline_class, config.path,
            hint="Point backbone.path at a local diffusers folder or download it first", **kwargs
        )
        return cls(pipe, config, device)

    @classmethod
    def extra_load_kwargs(cls, config: BackboneConfig) -> dict[str, Any]:
        return {}

    def _make_schedule(self) -> NoiseSchedule:
        spacing = self.config.timestep_spacing or self.default_timestep_spacing
        return DiffusionSchedule(self.pipe.scheduler.config, timestep_spacing=spacing)

    def _freeze_all(self) -> None:
        for module in self.pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
                module.eval()

    def _upcast_vae_if_needed(self) -> None:
        # SDXL's VAE overflows in fp16 (its config says force_upcast); decode it in fp32.
        vae = self.pipe.vae
        if self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)

    def _enable_xformers(self) -> None:
        if self.device.type != "cuda":
            raise RuntimeError("backbone.attention=xformers needs a CUDA device; use the default 'sdpa' on CPU")
        try:
            import xformers  # noqa: F401
        except ImportError as err:
            raise RuntimeError("backbone.attention=xformers but xformers is not installed (pip install genalign[xformers])") from err
        self.unwrapped_denoiser.enable_xformers_memory_efficient_attention()

    def compile_denoiser(self, mode: str = "all", warmup: int = WARMUP) -> bool:
        """``torch.compile`` the denoiser (inductor, default mode) for the forwards ``mode`` names:
        ``sampling``, the forwards without gradient with the adapters on (rollouts, sample grids,
        evaluation); ``all``, every forward and backward (training, reference passes). The others
        run eagerly. :attr:`denoiser` becomes a :class:`CompiledDenoiser`, :attr:`unwrapped_denoiser`
        stays the module itself (LoRA, state dicts, export and FSDP read it). Each kind of call is
        compiled after ``warmup`` eager calls (:class:`CompiledDenoiser`; compile times: docs/training.md,
        "Speed"). Returns False, with a warning, where inductor cannot compile (a CPU with no C++
        compiler, a GPU without triton)."""
        if mode not in ("sampling", "all"):
            raise ValueError(f"backbone.compile must be none, sampling or all, got {mode!r}")
        reason = compile_unavailable(self.device)
        if reason:
            warnings.warn(f"backbone.compile: {reason}; the denoiser runs eagerly", stacklevel=2)
            return False
        self.denoiser = CompiledDenoiser(self.unwrapped_denoiser, mode, warmup)
        return True

    # ------------------------------------------------------------------ the family-specific part

    @property
    def unwrapped_denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_component)

    @property
    def parameterisation(self) -> str:
        return self.schedule.prediction_type

    def encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True,
        images: Tensor | None = None,
    ) -> Conditioning:
        """Checked prompts (:meth:`check_prompts`) encoded by the family's text encoder(s); editing
        models also encode each prompt's source image (``images``, else the one it was given by
        :meth:`set_source_images` or ``backbone.source_images``)."""
        self.check_prompts(prompts)
        if not self.takes_images:
            if images is not None:
                raise ValueError(f"{self.config.family} is a text-to-image model: it takes no source images")
            return self._encode_prompts(prompts, negative_prompts, guidance)
        images = check_images(self.source_images_for(prompts) if images is None else images, len(prompts))
        return self._encode_edit(prompts, negative_prompts, guidance, images.to(self.device, torch.float32))

    def set_source_images(self, images: dict[str, Tensor]) -> None:
        """The source image (3, H, W) in [0, 1] each instruction prompt edits (added to those known), so
        that every method, rollout and evaluation encodes it with the prompt."""
        if not self.takes_images:
            raise ValueError(f"{self.config.family} is a text-to-image model: it takes no source images")
        for prompt, image in images.items():
            check_images(image[None] if isinstance(image, Tensor) else image, 1, f"the source image of {prompt!r}")
            self.source_images[prompt] = image.float().cpu()

    def source_images_for(self, prompts: Sequence[str]) -> Tensor:
        missing = [p for p in prompts if p not in self.source_images]
        if missing:
            raise ValueError(f"{self.config.family} edits a source image, and prompt {missing[0]!r} has none: set "
                             "backbone.source_images (a JSONL of prompt / source_image rows) or pass images")
        sizes = {tuple(self.source_images[p].shape) for p in prompts}
        if len(sizes) > 1:
            raise ValueError(f"the source images of one batch must share a size; got {sorted(sizes)}")
        return torch.stack([self.source_images[p] for p in prompts])

    def _encode_edit(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, guidance: bool,
                     images: Tensor) -> Conditioning:
        raise NotImplementedError

    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, guidance: bool
    ) -> Conditioning:
        raise NotImplementedError

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Prompts must be strings; one longer than the text encoder reads is truncated, which is
        reported once per backbone (the first such prompt, with its token count) instead of at every
        call as diffusers does."""
        if isinstance(prompts, str) or any(not isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if getattr(self, "_truncation_reported", False):
            return
        checked = self.__dict__.setdefault("_prompts_checked", set())
        for prompt in prompts:
            if prompt in checked:
                continue
            if len(checked) < 100_000:
                checked.add(prompt)
            for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
                tokenizer = getattr(self.pipe, name, None)
                if tokenizer is None:
                    continue
                tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's (FLUX.2 [dev]'s Pixtral)
                limit = ((self.max_sequence_length or tokenizer.model_max_length) if name in self.t5_tokenizers
                         else tokenizer.model_max_length)
                length = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
                if length > limit:
                    self._truncation_reported = True
                    print(f"genalign: a prompt has {length} tokens, {name} reads {limit}; the rest is cut off "
                          f"(reported once): {prompt[:80]!r}{'...' if len(prompt) > 80 else ''}", file=sys.stderr)
                    return

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _negatives(prompts: Sequence[str], negative_prompts: Sequence[str] | None, guidance: bool,
                   default: str = "") -> list[str]:
        """The negative prompts to encode with ``prompts`` (one each; ``default`` when none are given;
        none without guidance), for families that encode both in one call."""
        if not guidance:
            return []
        negatives = list(negative_prompts) if negative_prompts else [default] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return negatives

    def _token_shift_schedule(self) -> NoiseSchedule:
        """FLUX's flow schedule (also Qwen-Image's): ``linspace(1, 1/N, N)`` sigmas shifted with ``mu``
        interpolated from the image's token count between the scheduler config's base and max shift."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        from genalign.core.schedules import FlowSchedule

        config = self.pipe.scheduler.config
        _, h, w = self.latent_shape()
        self._schedule_tokens = (h // 2) * (w // 2)  # 2x2 patches
        mu = calculate_shift(self._schedule_tokens, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return FlowSchedule(config, mu=mu, linspace_sigmas=True)

    def _check_schedule_size(self, h: int, w: int) -> None:
        """Latents of the size the token-count shift was set for (:meth:`_token_shift_schedule`)."""
        if (h // 2) * (w // 2) != self._schedule_tokens:
            raise ValueError(
                f"{self.summary.split(' (')[0]}: the sigma shift (mu) was set for {self.resolution}px images "
                f"({self._schedule_tokens} tokens); these latents are {h * self.vae_scale_factor}x"
                f"{w * self.vae_scale_factor}px: set backbone.resolution to sample at another size"
            )

    # ------------------------------------------------------------------ the contract

    @property
    def max_sequence_length(self) -> int | None:
        """Prompt tokens read (SD3's and FLUX's T5, the LLM encoders of Qwen-Image, Z-Image, FLUX.2): the
        config's, else the checkpoint's genalign.json, else the family's default."""
        return self.config.max_sequence_length or self.defaults.get("max_sequence_length") or self.default_sequence_length

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """backbone.resolution, else the checkpoint's genalign.json ``resolution``, else the native size."""
        return self.config.resolution or self.defaults.get("resolution") or self.native_resolution

    @property
    def native_resolution(self) -> int:
        """The size the family's pipeline generates by default."""
        return self.unwrapped_denoiser.config.sample_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.unwrapped_denoiser.config.in_channels

    @property
    def latent_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE factor times the side of the latent patches
        packed into one token (``latent_patch``: FLUX-style 2x2 packing doubles it)."""
        return self.latent_patch * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        height, width = height or self.resolution, width or self.resolution
        f = self.latent_multiple
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of {f} (VAE factor, packing)")
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _inputs(
        self, x_t: Tensor, timestep: Tensor, cond: Conditioning
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], torch.dtype]:
        """Latents, per-sample timesteps and positive conditioning on the denoiser's device and dtype:
        fp16/bf16 weights take fp32 latents, and a fully fine-tuned fp32 denoiser takes bf16 text
        embeddings (and its bf16 reference fp32 ones)."""
        dtype = self.denoiser.dtype
        x_t = x_t.to(self.device, dtype)
        timestep = torch.as_tensor(timestep, device=self.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(x_t.shape[0])
        positive = {k: v.to(self.device, dtype) for k, v in cond.positive.items()}
        return x_t, timestep, positive, dtype

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Denoiser output; with guidance, uncond + g * (cond - uncond) in one batched call."""
        x_t, timestep, positive, dtype = self._inputs(x_t, timestep, cond)
        if guidance_scale == 1.0 or cond.negative is None:
            return self._denoise(x_t, timestep, positive)
        both = {k: torch.cat([cond.negative[k].to(self.device, dtype), positive[k]]) for k in positive}
        out = self._denoise(torch.cat([x_t, x_t]), torch.cat([timestep, timestep]), both)
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents + shift
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # Wan-style VAEs (Qwen-Image's, Wan's): frame-axis latents (B, C, F, h, w), normalised per channel
    # by the config's ``latents_mean`` / ``latents_std``.

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The per-channel mean and std, shaped (1, C, 1, 1, 1) like ``like``'s latents."""
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def _decode_normalised(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, F, h, w) -> pixels (B, 3, F, H, W) in [-1, 1], in the VAE's dtype."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean, std = self._latent_stats(latents)
        return vae.decode(latents * std + mean, return_dict=False)[0]

    def _encode_normalised(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F, h, w): the VAE's mean (its
        mode), or a sample with ``generator``."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        vae = self.pipe.vae
        dist = vae.encode((images * 2 - 1).to(self.device, vae.dtype)).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).to(self.dtype)

    # ------------------------------------------------------------------ training support

    def add_lora(
        self, rank: int, alpha: float, targets: Sequence[str] | None = None, dropout: float = 0.0
    ) -> None:
        from peft import LoraConfig

        denoiser = self.unwrapped_denoiser
        denoiser.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=dropout,
                init_lora_weights="gaussian",
                target_modules=list(targets or self.default_lora_targets),
            )
        )
        # Trainable LoRA weights stay in fp32 whatever the base weights' dtype (mixed precision).
        for param in denoiser.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        denoiser.eval()  # add_adapter makes its dropout modules in train mode; see training()

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.unwrapped_denoiser.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    @contextmanager
    def training(self) -> Iterator[None]:
        """Train mode for the denoiser (LoRA dropout on) within the context; eval mode otherwise, so
        that rollouts, re-scored log-probs and sample grids are deterministic."""
        denoiser = self.unwrapped_denoiser
        denoiser.train()
        try:
            yield
        finally:
            denoiser.eval()

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen starting model: LoRA adapters disabled, or a frozen copy under full fine-tuning."""
        if self.config.finetune == "lora":
            denoiser = self.unwrapped_denoiser
            denoiser.disable_adapters()
            compiled = self.denoiser if isinstance(self.denoiser, CompiledDenoiser) else None
            if compiled is not None:
                compiled.in_reference = True
            try:
                yield
            finally:
                denoiser.enable_adapters()
                if compiled is not None:
                    compiled.in_reference = False
        elif self.config.finetune == "full":
            if self._reference_copy is None:
                raise RuntimeError("no reference copy: call keep_reference() before training starts")
            current = self.denoiser
            self.denoiser = self._reference_copy
            try:
                yield
            finally:
                self.denoiser = current
        else:
            yield

    @contextmanager
    def merged(self) -> Iterator[None]:
        """The denoiser's LoRA merged into its weights within the context, for sampling without
        gradient (``backbone.merge_lora``): each wrapped layer computes ``x (W + s B A)^T`` in one
        product, not ``x W^T + s (x A^T) B^T`` in three. The merged weight is a new tensor and
        ``W`` is put back as it was (bitwise): training, checkpoints and the optimiser never see
        the merge. Full fp32 products only: under bf16 / fp16 (weights or autocast) or TF32
        (``run.tf32`` on CUDA) ``W + s B A`` rounds to the low precision and loses the updates
        below its step (the unmerged path keeps them), so it samples as it is there, and likewise
        with gradients on, inside :meth:`reference`, in train mode, under FSDP, or with a LoRA
        variant (DoRA) that a plain sum does not merge. Costs a copy of the wrapped weights while
        it lasts."""
        layers = self._mergeable_lora_layers()
        if not layers:
            yield
            return
        denoiser = self.unwrapped_denoiser
        trainable = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
        kept = []
        try:
            with torch.no_grad():
                for layer in layers:
                    weight = layer.get_base_layer().weight
                    delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                    kept.append((weight, weight.data))
                    weight.data = weight.data + delta
            denoiser.disable_adapters()
            yield
        finally:  # also when a merge fails half-way: the adapters were on, the weights are put back
            denoiser.enable_adapters()  # peft's enable / disable also set the adapters' requires_grad: restored
            for weight, data in kept:
                weight.data = data
            for param, flag in trainable:
                param.requires_grad_(flag)

    def _mergeable_lora_layers(self) -> list[nn.Module]:
        """The LoRA layers :meth:`merged` merges, or none when it must sample unmerged."""
        if not self.config.merge_lora or torch.is_grad_enabled() or self.sharded or self.dtype != torch.float32:
            return []
        device = self.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != torch.float32:
            return []
        if _reduced_fp32(device):
            return []  # fp32 products through TF32 / bf16 units: the same rounding as under autocast
        denoiser = self.unwrapped_denoiser
        if denoiser.training:
            return []
        from peft.tuners.lora import LoraLayer

        layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
        for layer in layers:
            if layer.disable_adapters or layer.merged or getattr(layer, "lora_variant", None):
                return []  # in reference(), merged by peft, or a variant: nothing (or not a plain sum) to merge
            if layer.get_base_layer().weight.dtype != torch.float32:
                return []
        return layers

    def keep_reference(self) -> None:
        """Under full fine-tuning, keep a frozen copy of the starting denoiser (LoRA needs none)."""
        if self.config.finetune == "full" and self._reference_copy is None:
            if self.sharded:
                raise RuntimeError("keep_reference() after shard(): shard() keeps the reference itself")
            self._reference_copy = copy.deepcopy(self.unwrapped_denoiser).requires_grad_(False).to(self.dtype)

    @property
    def sharded(self) -> bool:
        from genalign.core.sharding import is_sharded_module

        return is_sharded_module(self.unwrapped_denoiser)

    @property
    def compiled(self) -> str:
        return self.denoiser.mode if isinstance(self.denoiser, CompiledDenoiser) else "none"

    def shard(self, plan: Any) -> int:
        """Shard the denoiser across the processes (FSDP, ``genalign.core.sharding``); under full
        fine-tuning the frozen reference copy is made first and sharded too. Call it before a
        fine-tuner is built (sharding replaces the parameters). Returns the number of units."""
        from genalign.core.sharding import shard_module

        if plan.activation_checkpointing and not self.config.gradient_checkpointing:
            self.unwrapped_denoiser.enable_gradient_checkpointing()
        units = 0
        if self.config.finetune == "full":
            self.keep_reference()
            units += shard_module(self._reference_copy, plan)
        return units + shard_module(self.unwrapped_denoiser, plan)

    def save_lora(self, directory: str | Path) -> Path:
        """Write the LoRA in diffusers format (``pytorch_lora_weights.safetensors``)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if self.config.finetune != "lora":
            raise RuntimeError("save_lora needs backbone.finetune=lora")
        from genalign.core.sharding import gather_full, main_process, reshard

        denoiser = self.unwrapped_denoiser
        if self.sharded:  # every process gathers the LoRA's shards; the main one writes
            reshard(denoiser)  # named_parameters() are the shards again
            full = gather_full(dict(self.named_trainable_parameters()), keep=main_process())
            if not main_process():
                return Path(directory) / "pytorch_lora_weights.safetensors"
            state = get_peft_model_state_dict(denoiser, state_dict=full)
        else:
            state = get_peft_model_state_dict(denoiser)
        if self.lora_keys_to_diffusers:
            state = convert_state_dict_to_diffusers(state)
        # The LoRA config (rank, alpha, targets) goes into the file's metadata, so that
        # load_lora_weights restores the alpha / rank scale (without it a LoRA reloads at scale 1).
        metadata_kwarg = self.lora_layers_kwarg.replace("_layers", "_adapter_metadata")
        metadata = next(iter(denoiser.peft_config.values())).to_dict()
        self.pipeline_class.save_lora_weights(directory, **{self.lora_layers_kwarg: state, metadata_kwarg: metadata},
                                              safe_serialization=True)
        return Path(directory) / "pytorch_lora_weights.safetensors"

    def save_denoiser(self, directory: str | Path) -> Path:
        """Write the whole denoiser (full fine-tuning) as a diffusers model folder; a sharded one is
        gathered tensor by tensor (every process takes part, the main one writes)."""
        from genalign.core.sharding import gather_full, main_process, reshard, unsharded_class

        directory = Path(directory)
        denoiser = self.unwrapped_denoiser
        if not self.sharded:
            denoiser.save_pretrained(directory)
            return directory
        reshard(denoiser)
        from huggingface_hub import save_torch_state_dict

        state = {name: gather_full(t, keep=main_process()) for name, t in denoiser.state_dict().items()}
        if main_process():
            directory.mkdir(parents=True, exist_ok=True)
            denoiser.save_config(directory)
            config_file = directory / "config.json"  # the class, not fully_shard's FSDP<class> subclass
            config = json.loads(config_file.read_text())
            config["_class_name"] = unsharded_class(denoiser).__name__
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_torch_state_dict(state, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                  max_shard_size="10GB")
        return directory

    def export(self, directory: str | Path) -> Path:
        """The trained result: the LoRA (diffusers format) in ``directory`` or, under full
        fine-tuning, the denoiser (``save_pretrained``) in ``directory/denoiser``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.finetune == "lora":
            return self.save_lora(directory)
        return self.save_denoiser(directory / "denoiser")

    def load_lora(self, path: str | Path) -> None:
        """Load a diffusers-format LoRA (ours or any other) into the pipeline for sampling."""
        if not Path(path).exists():
            raise WeightsNotFoundError(f"LoRA weights not found: {path}")
        self.pipe.load_lora_weights(str(path))
        self.pipe.to(self.device)

    def unload_lora(self) -> None:
        """Remove what :meth:`load_lora` loaded: the pipeline samples as the base again."""
        self.pipe.unload_lora_weights()
