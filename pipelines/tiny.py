"""Tiny random models of each family, built from configs with the real diffusers/transformers
classes and saved as ordinary diffusers folders, so tests load them through the real loaders.

Tokenizers are built locally (no hub): a character-level CLIP BPE vocabulary written as
vocab.json + merges.txt (transformers 5 ignores vocab_file/merges_file passed directly).
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

TEXT_HIDDEN = 32
MAX_TOKENS = 32


def build_clip_tokenizer(folder: str | Path | None = None, max_length: int = MAX_TOKENS) -> Any:
    """A character-level CLIPTokenizer (every printable character is a token, plus its ``</w>`` form)."""
    from transformers import CLIPTokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="genalign-tok-"))
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    if len(tokenizer) != len(tokens):  # guards against the transformers 5 silent-vocab pitfall
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(tokens)}")
    return tokenizer


def _text_config(vocab_size: int, projection_dim: int = TEXT_HIDDEN) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Two blocks: a VAE factor of 2, latents 8x8x4 for 16x16 images.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def _sd_scheduler(prediction_type: str, turbo: bool) -> Any:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type)
    if turbo:  # SD-Turbo / SDXL-Turbo ship an Euler scheduler with trailing spacing
        return EulerDiscreteScheduler(**common, timestep_spacing="trailing", steps_offset=1)
    # The SD 1.5 scheduler config.
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd_pipeline(prediction_type: str = "epsilon", turbo: bool = False, seed: int = 0) -> Any:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(prediction_type, turbo),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", turbo: bool = False, seed: int = 0) -> Any:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN,  # the two encoders' hidden states, concatenated
        attention_head_dim=(4, 8),
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(),
        unet=unet,
        scheduler=_sd_scheduler(prediction_type, turbo),
    )


TINY_BUILDERS = {
    "sd": lambda prediction_type, seed: tiny_sd_pipeline(prediction_type, False, seed),
    "sd-turbo": lambda prediction_type, seed: tiny_sd_pipeline(prediction_type, True, seed),
    "sdxl": lambda prediction_type, seed: tiny_sdxl_pipeline(prediction_type, False, seed),
    "sdxl-turbo": lambda prediction_type, seed: tiny_sdxl_pipeline(prediction_type, True, seed),
}


def save_tiny(family: str, folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the tiny random model of ``family`` and save it as a diffusers folder (safetensors)."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}; available: {', '.join(TINY_BUILDERS)}")
    pipe = TINY_BUILDERS[family](prediction_type, seed)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
