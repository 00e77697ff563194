"""The moving-shapes world's video model (``genalign shapes build --stages video_vae,video``): a tiny Wan 2.1
(WanPipeline: AutoencoderKLWan, WanTransformer3DModel, UMT5EncoderModel) trained from scratch on the
world's videos (``genalign.shapes.video``), saved to ``<out>/video`` with its ``build.json``.

* VAE: Wan's causal 3D VAE at factor 2 in space and time (9 x 32 x 32 x 3 videos <-> 5 x 16 x 16 x
  4 latents), L1 reconstruction with object pixels weighted 10x + 1e-6 KL (through its output clamp
  with a straight-through gradient), lr 2e-3; then per-channel ``latents_mean`` / ``latents_std``
  measured on the training videos (what the pipeline normalises with). Why these settings:
  docs/shapes.md, "Moving shapes (video)".
* Transformer (4 blocks, width 128, 4x4 patches: 80 tokens a video) and text encoder (a 2-layer
  UMT5 on a word-level tokenizer of the world's prompts) trained together by flow matching through
  genalign's Wan backbone (logit-normal sigmas, 10% empty prompts for guidance).
* Scheduler: Wan's flow UniPC config with ``flow_shift`` 1 (genalign samples its Euler steps).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from genalign.shapes.video import FRAMES, video_examples, video_words
from genalign.shapes.world import IMAGE_SIZE

VIDEO_TOKENS = 12  # "a square turning from purple to yellow" + BOS / EOS fits
VIDEO_HIDDEN = 128
LATENT_CHANNELS = 4
OBJECT_WEIGHT = 10.0  # the VAE's L1 weight of pixels inside an object (the black background is most pixels)


def make_video_vae() -> Any:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                            temperal_downsample=[True], latents_mean=[0.0] * LATENT_CHANNELS,
                            latents_std=[1.0] * LATENT_CHANNELS, scale_factor_temporal=2, scale_factor_spatial=2)


def make_video_pipeline(vae: Any, seed: int) -> Any:
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from genalign.pipelines.tiny import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words=video_words(), max_length=VIDEO_TOKENS)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=VIDEO_HIDDEN, d_kv=32, d_ff=4 * VIDEO_HIDDEN, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0))
    transformer = WanTransformer3DModel(
        patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=VIDEO_HIDDEN, freq_dim=64, ffn_dim=4 * VIDEO_HIDDEN, num_layers=4,
        rope_max_seq_len=64)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                        num_train_timesteps=1000)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)


def make_video_dataset(size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``size`` train-split videos (N, 3, F, 32, 32) in [-1, 1] (the VAE's layout), fp16, and their prompts."""
    stream = video_examples("train", seed)
    videos, prompts = [], []
    for _ in range(size):
        video, prompt = next(stream)
        videos.append(torch.from_numpy(video).permute(3, 0, 1, 2).half())
        prompts.append(prompt)
    return torch.stack(videos) * 2 - 1, prompts


class _StraightThroughClamp:
    """``torch`` as AutoencoderKLWan's module sees it, but ``clamp`` passes gradients through: its
    decoder clamps to [-1, 1], and a decoder that starts below -1 everywhere (an all-black video,
    which the black backgrounds make likely) then gets no gradient at all. The forward is unchanged."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def clamp(x: torch.Tensor, min: float | None = None, max: float | None = None) -> torch.Tensor:  # noqa: A002
        return x + (torch.clamp(x, min=min, max=max) - x).detach()


@contextmanager
def straight_through_clamp() -> Iterator[None]:
    from diffusers.models.autoencoders import autoencoder_kl_wan as module

    module.torch = _StraightThroughClamp()  # type: ignore[assignment]
    try:
        yield
    finally:
        module.torch = torch


def train_video_vae(videos: torch.Tensor, config: Any, log: dict[str, Any]) -> Any:
    from genalign.shapes.build import _train

    torch.manual_seed(config.seed + 8)
    vae = make_video_vae()

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        batch = videos[torch.randint(len(videos), (config.video_vae_batch_size,), generator=g)].float()
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(g)).sample
        weight = 1 + (OBJECT_WEIGHT - 1) * (batch.amax(dim=1, keepdim=True) > -0.9).float()
        return (weight * (recon.float() - batch).abs()).mean() + 1e-6 * posterior.kl().mean()

    with straight_through_clamp():
        _train("video_vae", list(vae.parameters()), config.video_vae_steps, 2e-3, loss_fn, config.seed + 8, log)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = encode_video_latents(vae, videos[:1024])
        channels = latents.transpose(0, 1).flatten(1)
        vae.register_to_config(latents_mean=channels.mean(1).tolist(), latents_std=channels.std(1).tolist())
        recon = vae.decode(vae.encode(videos[:64].float()).latent_dist.mean).sample
    log["video_vae"]["reconstruction_l1"] = float((recon - videos[:64].float()).abs().mean())
    return vae


@torch.no_grad()
def encode_video_latents(vae: Any, videos: torch.Tensor) -> torch.Tensor:
    """The VAE means (N, C, f, h, w), not normalised."""
    return torch.cat([vae.encode(videos[i : i + 128].float()).latent_dist.mean for i in range(0, len(videos), 128)])


def train_video(backbone: Any, videos: torch.Tensor, prompts: list[str], config: Any, log: dict[str, Any]) -> None:
    """Flow matching of the normalised video latents given the prompt, through genalign's Wan
    backbone; the transformer and the text encoder train together, 10% of prompts empty."""
    from genalign.core.types import Conditioning
    from genalign.shapes.build import _train

    pipe = backbone.pipe
    pipe.text_encoder.requires_grad_(True).train()
    pipe.transformer.train()
    raw = encode_video_latents(pipe.vae, videos)
    mean, std = backbone._latent_stats(raw)
    latents = (raw - mean) / std
    unique = sorted(set(prompts)) + [""]
    row = {p: i for i, p in enumerate(unique)}
    tokens = pipe.tokenizer(unique, padding="max_length", max_length=VIDEO_TOKENS, truncation=True,
                            return_attention_mask=True, return_tensors="pt")
    prompt_rows = torch.tensor([row[p] for p in prompts])
    empty = row[""]

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(prompts), (config.video_batch_size,), generator=g)
        rows = torch.where(torch.rand(len(idx), generator=g) < config.empty_caption_rate, empty, prompt_rows[idx])
        ids, mask = tokens.input_ids[rows], tokens.attention_mask[rows]
        states = pipe.text_encoder(ids, mask).last_hidden_state * mask[..., None]  # as the pipeline: padding zeroed
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=g))  # logit-normal, shift 1
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = backbone.predict((1 - s) * x0 + s * noise, sigma * 1000, Conditioning({"prompt_embeds": states}))
        return ((pred.float() - (noise - x0)) ** 2).mean()

    params = [*pipe.transformer.parameters(), *pipe.text_encoder.parameters()]
    _train("video", params, config.video_steps, config.video_lr, loss_fn, config.seed + 9, log)
    for module in (pipe.transformer, pipe.text_encoder):
        module.eval().requires_grad_(False)


def write_video_prompts(folder: Path) -> None:
    """``prompts_train.txt`` / ``prompts_heldout.txt``: every prompt of each split, one a line."""
    from genalign.shapes.video import split_video_prompts

    for split in ("train", "heldout"):
        (folder / f"prompts_{split}.txt").write_text("".join(m["prompt"] + "\n" for m in split_video_prompts(split)))


def build_video(config: Any, out: Path, log: dict[str, Any]) -> None:
    """Stage ``video_vae`` trains and saves the VAE (``video/vae``); stage ``video`` trains the
    transformer and text encoder on the saved VAE (fp16 weights, as shipped), so that ``video`` alone
    gives what a build of both gives."""
    from diffusers import AutoencoderKLWan

    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines.wan import WanBackbone

    folder = out / "video"
    videos, prompts = make_video_dataset(config.video_dataset_size, config.seed + 8)
    if "video_vae" in config.stages:
        train_video_vae(videos, config, log).to(torch.float16).save_pretrained(folder / "vae", safe_serialization=True)
    if "video" not in config.stages:
        return
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    pipe = make_video_pipeline(vae, config.seed + 9)
    pipe.genalign_defaults = {}
    backbone = WanBackbone(pipe, BackboneConfig(family="wan", finetune="full", resolution=IMAGE_SIZE, frames=FRAMES,
                                                max_sequence_length=VIDEO_TOKENS))
    train_video(backbone, videos, prompts, config, log)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    (folder / "genalign.json").write_text(json.dumps({"resolution": IMAGE_SIZE, "frames": FRAMES,
                                                      "max_sequence_length": VIDEO_TOKENS}) + "\n")
    write_video_prompts(folder)
