"""Wan 2.1 / 2.2 text-to-video (Wan team 2025): WanTransformer3DModel (a DiT with cross-attention to
UMT5 prompt states) on the video latents of the Wan VAE (diffusers' WanPipeline).

Video is one more latent axis: latents are (B, C, f, h, w) with ``f = (frames - 1) / s_t + 1`` (the
VAE's temporal factor s_t, 4 for Wan) and ``decode`` returns (B, F, 3, H, W) in [0, 1], the layout of
the pipeline's ``output_type="pt"``; everything else (samplers, SDE log-probs, every flow method) is
rank-generic. As the pipeline does it: prompts are cleaned, tokenised to ``max_sequence_length``
(512), their UMT5 states cut to the real tokens and zero-padded back (no mask reaches the
transformer); the transformer takes the model timestep ``sigma * 1000`` and predicts the flow
velocity (noise - x0); guidance is ``uncond + w (cond - uncond)`` with the negative prompt ``""``
unless given (Wan's model cards pass a long one: set ``sample.negative_prompt``).

The sampler. Wan checkpoints ship UniPCMultistepScheduler (``flow_shift`` 3 for 480p, 5 for 720p), a
multistep solver with no per-step density; genalign steps the flow ODE / SDE with Euler as for every
flow model, on FlowMatchEulerDiscreteScheduler's sigmas at the checkpoint's shift (DanceGRPO and
Pref-GRPO train Wan the same way, shift 3). Parity is with WanPipeline given that scheduler.

Wan 2.2. T2V-A14B has two experts: ``transformer`` for timesteps >= ``boundary_ratio * 1000`` (high
noise), ``transformer_2`` below. One is trained (``backbone.expert``: ``high`` by default, or
``low``), as DiffSynth-Studio and musubi-tuner train them, and the other stays frozen; ``predict``
sends each sample to the expert of its timestep (a batch may mix them), with one guidance scale for
both (the pipeline's default when ``guidance_scale_2`` is not given). A LoRA of the low expert loads
with ``load_lora_weights(..., load_into_transformer_2=True)``. Under FSDP both experts are sharded
and an expert runs on every process as soon as one process has samples for it. TI2V-5B
(``expand_timesteps``) takes one timestep per latent token, all equal for text-to-video.
Image-to-video: ``wan-i2v`` (:class:`WanImageToVideoBackbone`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from torch import Tensor, nn

from genalign.core.experiment import BackboneConfig
from genalign.core.schedules import FlowSchedule, NoiseSchedule
from genalign.core.types import Conditioning
from genalign.pipelines import register
from genalign.pipelines.base import DiffusersBackbone, WeightsNotFoundError

EXPERTS = {"high": "transformer", "low": "transformer_2"}


@register("wan")
class WanBackbone(DiffusersBackbone):
    summary = "Wan 2.1 / 2.2 text-to-video (DiT flow matching on Wan-VAE video latents, UMT5 prompt states)"
    pipeline_class: ClassVar[type] = WanPipeline
    denoiser_component: ClassVar[str] = "transformer"
    video: ClassVar[bool] = True
    # self- and cross-attention projections of every block (diffusers' Wan LoRA loader reads these)
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"
    lora_keys_to_diffusers: ClassVar[bool] = False
    t5_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)  # reads max_sequence_length tokens
    default_sequence_length: ClassVar[int] = 512  # the pipeline's default
    default_frames: ClassVar[int] = 81  # the pipeline's default num_frames

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        return {"wan": lambda prediction_type, seed: tiny_wan_pipeline(seed),
                "wan22": lambda prediction_type, seed: tiny_wan_pipeline(seed, experts=2),
                "wan22-ti2v": lambda prediction_type, seed: tiny_wan_pipeline(seed, ti2v=True)}

    def __init__(self, pipe: Any, config: BackboneConfig, device: str | torch.device = "cpu"):
        two = getattr(pipe, "transformer_2", None) is not None and pipe.config.boundary_ratio is not None
        expert = config.expert or "high"
        if expert not in EXPERTS:
            raise ValueError(f"backbone.expert must be 'high' or 'low', got {config.expert!r}")
        if config.expert and not two:
            raise ValueError("backbone.expert: this Wan checkpoint has one transformer (Wan 2.2 A14B has two)")
        self.expert = expert if two else None
        if two:
            self.denoiser_component = EXPERTS[expert]  # the trained one; the other stays frozen
        super().__init__(pipe, config, device)

    # ------------------------------------------------------------------ sizes

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    @property
    def temporal_factor(self) -> int:
        return int(self.pipe.vae_scale_factor_temporal)

    @property
    def latent_multiple(self) -> int:
        """The VAE factor times the transformer's spatial patch side (its patching is inside the model)."""
        return int(self.unwrapped_denoiser.config.patch_size[1]) * self.vae_scale_factor

    @property
    def native_resolution(self) -> int:
        return 480  # Wan 2.1's 480p models (square here; the pipeline's default is 480 x 832)

    @property
    def frames(self) -> int:
        """Frames a video: backbone.frames, else the checkpoint's genalign.json, else the pipeline's 81;
        ``frames - 1`` must be a multiple of the VAE's temporal factor."""
        frames = int(self.config.frames or self.defaults.get("frames") or self.default_frames)
        if frames < 1 or (frames - 1) % self.temporal_factor:
            raise ValueError(f"backbone.frames={frames}: Wan needs frames - 1 divisible by {self.temporal_factor} "
                             f"(e.g. {(frames - 1) // self.temporal_factor * self.temporal_factor + 1})")
        return frames

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        channels, h, w = super().latent_shape(height, width)
        return (channels, (self.frames - 1) // self.temporal_factor + 1, h, w)

    # ------------------------------------------------------------------ schedule and prompts

    def _make_schedule(self) -> NoiseSchedule:
        config = self.pipe.scheduler.config
        if self.pipe.scheduler.__class__.__name__ == "FlowMatchEulerDiscreteScheduler":
            return FlowSchedule(config)
        if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
            raise ValueError(f"Wan: unsupported scheduler {self.pipe.scheduler.__class__.__name__} (expected the flow "
                             "UniPC scheduler Wan ships, or FlowMatchEulerDiscreteScheduler)")
        return FlowSchedule({"num_train_timesteps": config.get("num_train_timesteps", 1000),
                             "shift": float(config.get("flow_shift", 1.0))})

    @torch.no_grad()
    def _encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, guidance: bool = True
    ) -> Conditioning:
        prompts = list(prompts)
        negatives = self._negatives(prompts, negative_prompts, guidance, "")
        embeds, _ = self.pipe.encode_prompt(prompt=prompts + negatives, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        rows = len(prompts)
        return Conditioning({"prompt_embeds": embeds[:rows]}, {"prompt_embeds": embeds[rows:]} if guidance else None,
                            prompts)

    # ------------------------------------------------------------------ the denoiser

    @property
    def boundary(self) -> float | None:
        """Wan 2.2 A14B: the model timestep from which the high-noise expert denoises (None: one expert)."""
        if self.expert is None:
            return None
        return float(self.pipe.config.boundary_ratio) * self.pipe.scheduler.config.num_train_timesteps

    @property
    def frozen_expert(self) -> nn.Module | None:
        """Wan 2.2 A14B: the expert that is not trained (None: one expert)."""
        if self.expert is None:
            return None
        return getattr(self.pipe, EXPERTS["low" if self.expert == "high" else "high"])

    def shard(self, plan: Any) -> int:
        """FSDP: the trained denoiser as every backbone shards it, and under Wan 2.2 A14B the frozen
        expert too (14B parameters that each process would otherwise hold whole)."""
        from genalign.core.sharding import shard_module

        units = super().shard(plan)
        other = self.frozen_expert
        return units + (shard_module(other, plan) if other is not None else 0)  # frozen since loading

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if self.expert is None:
            return self._call(self.denoiser, x, t, cond)
        high = t >= self.boundary
        trained = high if self.expert == "high" else ~high
        other = self.frozen_expert
        assert other is not None
        # (expert, its rows, how it is called): the trained one as it is, the frozen one in its dtype
        routes = ((self.denoiser, trained, self._call), (other, ~trained, self._call_frozen))
        if self.sharded:
            return self._denoise_sharded(x, t, cond, routes)
        if bool(trained.all()):
            return self._call(self.denoiser, x, t, cond)
        if not bool(trained.any()):
            return self._call_frozen(other, x, t, cond)
        out = torch.empty_like(x)
        for module, rows, call in routes:
            out[rows] = call(module, x[rows], t[rows], {k: v[rows] for k, v in cond.items()})
        return out

    def _denoise_sharded(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], routes: Any) -> Tensor:
        """Expert routing under FSDP: a sharded expert's forward (and the trained one's backward) is a
        collective, so every process runs an expert when any process has samples for it; a process
        with none runs it on one of its samples and adds the result times 0 (zero gradient, the same
        collectives as the others)."""
        import torch.distributed as dist

        wanted = torch.stack([rows.any() for _, rows, _ in routes]).to(torch.int32)
        dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
        out, unused = torch.empty_like(x), x.new_zeros(())
        for (module, rows, call), needed in zip(routes, wanted.tolist()):
            if not needed:
                continue
            if bool(rows.any()):
                out[rows] = call(module, x[rows], t[rows], {k: v[rows] for k, v in cond.items()})
            else:
                unused = unused + call(module, x[:1], t[:1], {k: v[:1] for k, v in cond.items()}).sum() * 0.0
        return out + unused

    def _call_frozen(self, module: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The frozen expert, in its own dtype; without a graph unless the input needs one (ReNO's
        gradient through the sampler), so that no parameters stay gathered for a backward under FSDP."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return self._call(module, x.to(module.dtype), t, cond).to(x.dtype)

    def _call(self, module: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        timestep = t.to(x.dtype)
        if self.pipe.config.expand_timesteps:  # TI2V-5B: one timestep per latent token (2x2 patches)
            _, _, f, h, w = x.shape
            timestep = timestep[:, None].expand(-1, f * (h // 2) * (w // 2))
        return module(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"].to(x.dtype),
                      return_dict=False)[0]

    # ------------------------------------------------------------------ the VAE

    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, f, h, w) latents -> (B, F, 3, H, W) video in [0, 1]."""
        video = self._decode_normalised(latents)  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, F, 3, H, W) video in [0, 1] -> normalised latents (B, C, f, h, w) (the VAE mean, or a sample)."""
        if images.ndim != 5:
            raise ValueError(f"Wan encodes videos (B, F, 3, H, W); got {tuple(images.shape)}")
        return self._encode_normalised((images * 2 - 1).permute(0, 2, 1, 3, 4), generator).to(self.dtype)

    def load_lora(self, path: str | Path) -> None:
        """A diffusers-format Wan LoRA; for the low-noise expert of Wan 2.2 A14B it goes into ``transformer_2``."""
        if not Path(path).exists():
            raise WeightsNotFoundError(f"LoRA weights not found: {path}")
        extra = {"load_into_transformer_2": True} if self.expert == "low" else {}
        self.pipe.load_lora_weights(str(path), **extra)
        self.pipe.to(self.device)


@register("wan-i2v")
class WanImageToVideoBackbone(WanBackbone):
    """Wan 2.1 I2V and Wan 2.2 I2V-A14B (WanImageToVideoPipeline): the video starts from each prompt's
    source image, given as an editing model's is (``backbone.source_images`` or ``images=``).

    As the pipeline does it: the image is resized to the video's size and VAE-encoded as the first
    frame of an otherwise black video; its normalised latents, behind a mask that marks the first
    frame (one channel per frame of a latent frame), are concatenated to the noisy latents on the
    channel axis at every step (the transformer reads C + s_t + C channels); Wan 2.1's transformer
    also cross-attends to the CLIP vision tower's penultimate states of the image (its
    ``image_processor`` on the image as 8-bit RGB). Guidance shares the image between the branches.
    TI2V-5B's first-frame replacement (``expand_timesteps``) is not covered.
    """

    summary = "Wan 2.1 / 2.2 image-to-video (the first frame from a source image; CLIP image states for 2.1)"
    pipeline_class: ClassVar[type] = WanImageToVideoPipeline
    takes_images: ClassVar[bool] = True

    @classmethod
    def tiny_layouts(cls) -> dict[str, Callable[[str, int], Any]]:
        return {"wan-i2v": lambda prediction_type, seed: tiny_wan_pipeline(seed, i2v=True),
                "wan22-i2v": lambda prediction_type, seed: tiny_wan_pipeline(seed, experts=2, i2v=True)}

    def __init__(self, pipe: Any, config: BackboneConfig, device: str | torch.device = "cpu"):
        if pipe.config.expand_timesteps:
            raise ValueError("wan-i2v: TI2V-5B's image-to-video (expand_timesteps) is not supported; its text-to-video "
                             "runs as family wan")
        super().__init__(pipe, config, device)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.z_dim)

    @torch.no_grad()
    def _encode_edit(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, guidance: bool,
                     images: Tensor) -> Conditioning:
        from genalign.core.images import to_pil_images

        text = self._encode_prompts(prompts, negative_prompts, guidance)
        size = self.resolution
        pixels = self.pipe.video_processor.preprocess(images, height=size, width=size).to(self.device, torch.float32)
        video = torch.cat([pixels[:, :, None], pixels.new_zeros(len(prompts), 3, self.frames - 1, size, size)], dim=2)
        latents = self._encode_normalised(video)  # the mode, as the pipeline ("argmax")
        _, _, f, h, w = latents.shape
        mask = torch.zeros(len(prompts), self.temporal_factor, f, h, w, dtype=latents.dtype, device=latents.device)
        mask[:, :, 0] = 1  # the first frame is given (its temporal_factor slots: the first frame repeated)
        extra = {"condition": torch.cat([mask, latents], dim=1)}
        if self.unwrapped_denoiser.config.image_dim is not None:  # Wan 2.1: CLIP image states
            encoder = self.pipe.image_encoder
            inputs = self.pipe.image_processor(images=to_pil_images(images), return_tensors="pt").to(self.device)
            extra["image_embeds"] = encoder(**inputs, output_hidden_states=True).hidden_states[-2]
        positive = {**text.positive, **extra}
        negative = {**text.negative, **extra} if text.negative is not None else None
        return Conditioning(positive, negative, list(prompts))

    def _call(self, module: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        image = cond.get("image_embeds")
        return module(hidden_states=torch.cat([x, cond["condition"].to(x.dtype)], dim=1), timestep=t.to(x.dtype),
                      encoder_hidden_states=cond["prompt_embeds"].to(x.dtype),
                      encoder_hidden_states_image=None if image is None else image.to(x.dtype), return_dict=False)[0]


def tiny_wan_pipeline(seed: int = 0, experts: int = 1, ti2v: bool = False, i2v: bool = False) -> Any:
    """A tiny random Wan from configs with the real classes: a two-layer UMT5 encoder on a
    character-level tokenizer, a two-block WanTransformer3DModel (patches 1x2x2), a Wan VAE of
    factor 2 in space and time (5 latent frames for 9 frames, 16 x 16 px: ``genalign.json``) and Wan's
    flow UniPC scheduler (shift 3). ``experts=2``: Wan 2.2 A14B's layout (a second transformer below
    ``boundary_ratio`` 0.875); ``ti2v``: TI2V-5B's (``expand_timesteps``, Wan 2.2's residual VAE on
    2x2-patchified pixels, spatial factor 4); ``i2v``: WanImageToVideoPipeline's (10 input channels,
    and for Wan 2.1 a CLIP vision tower of width 16)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from genalign.pipelines.tiny import TEXT_HIDDEN, build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))

    image = i2v and experts == 1  # Wan 2.1 I2V reads CLIP image states; Wan 2.2 I2V-A14B does not

    def transformer() -> Any:
        # I2V: noisy latents, the first-frame mask (temporal factor 2: 2 channels) and the condition latents
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                     in_channels=4 + 2 + 4 if i2v else 4, out_channels=4, text_dim=TEXT_HIDDEN,
                                     freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                                     image_dim=16 if image else None, added_kv_proj_dim=16 if image else None)

    stats = {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 0.8, 1.2, 2.0]}
    if ti2v:  # Wan 2.2's VAE: residual blocks on 2x2-patchified pixels (12 channels), factor 4 here (16 real)
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                               is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                               scale_factor_temporal=2, scale_factor_spatial=4, **stats)
    else:
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                               scale_factor_temporal=2, scale_factor_spatial=2, **stats)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    extra: dict[str, Any] = {}
    if experts == 2:
        extra = {"transformer_2": transformer(), "boundary_ratio": 0.875}
    if i2v:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        vision = {}
        if image:
            vision = {"image_encoder": CLIPVisionModel(CLIPVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)), "image_processor": CLIPImageProcessor(size={"shortest_edge": 32},
                                                                      crop_size={"height": 32, "width": 32})}
        pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer(),
                                       scheduler=scheduler, **vision, **extra)
    else:
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer(),
                           scheduler=scheduler, expand_timesteps=ti2v, **extra)
    pipe.genalign_defaults = {"resolution": 16, "frames": 9}
    return pipe
