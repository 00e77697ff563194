"""CLIP score: ``logit_scale.exp() * cos(image embedding, text embedding)``, with the model's own
learned scale (100 for OpenAI CLIP), on transformers ``CLIPModel`` or open_clip models.

Config: ``{name: clip, path: openai/clip-vit-large-patch14}`` (transformers, hub id or folder), or
``{name: clip, path: laion2b_s32b_b79k, options: {model: ViT-H-14}}`` (open_clip: ``model`` is
an open_clip architecture, ``path`` its pretrained tag, a local checkpoint file or empty), or
``path: hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (open_clip from the hub).
The shapes world's proxy reward is this adapter on ``models/shapes/clip``.

The two encoders below are reused by PickScore (a fine-tuned transformers CLIP-H) and HPSv2
(an open_clip ViT-H-14 with HPS weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genalign.core.experiment import RewardConfig
from genalign.core.loading import WeightsNotFoundError, from_pretrained_or_explain
from genalign.rewards import register
from genalign.rewards.base import DTYPES, Metadata, RewardModel, cached, check_options, checkpoint_layers, freeze
from genalign.rewards.preprocess import ImageTransform, clip_transform


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class TransformersCLIP(nn.Module):
    """A transformers CLIPModel with its tokenizer and its image processor's settings as a tensor
    transform. ``processor_path`` holds tokenizer + preprocessor config when the weights' repo
    lacks them (PickScore's)."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, processor_path: str | None = None,
                 checkpointing: bool = False):
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = freeze(from_pretrained_or_explain(CLIPModel, path, dtype=dtype, hint="Set reward.path")).to(device)
        processor_path = processor_path or path
        self.tokenizer = from_pretrained_or_explain(AutoTokenizer, processor_path)
        processor = from_pretrained_or_explain(CLIPImageProcessor, processor_path)
        size = processor.size.get("shortest_edge") or min(processor.size["height"], processor.size["width"])
        crop = processor.crop_size if processor.do_center_crop else None
        self.transform = ImageTransform(
            int(size), (crop["height"], crop["width"]) if crop else None,
            tuple(processor.image_mean), tuple(processor.image_std),
            "bicubic" if int(processor.resample) == 3 else "bilinear",
            floor_crop=True,  # transformers' processors floor the crop offset
        )
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.dtype = dtype
        if checkpointing:
            checkpoint_layers(self.model.vision_model.encoder.layers)
            checkpoint_layers(self.model.text_model.encoder.layers)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float()

    def image_embeds(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> projected embeddings (B, D), fp32, not normalised."""
        pixels = self.transform(images).to(self.dtype)
        return self.model.get_image_features(pixel_values=pixels).pooler_output.float()

    def text_embeds(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(self.model.device)
        return self.model.get_text_features(input_ids=tokens.input_ids,
                                            attention_mask=tokens.attention_mask).pooler_output.float()


class OpenCLIP(nn.Module):
    """An open_clip model (architecture ``model_name``; weights from a pretrained tag, a local
    checkpoint file, ``hf-hub:`` id, or a state dict given later), its tokenizer and its
    preprocessing config as a tensor transform."""

    def __init__(self, model_name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype,
                 checkpointing: bool = False):
        super().__init__()
        import open_clip

        try:
            model = open_clip.create_model(model_name, pretrained=pretrained or None, weights_only=True)
        except (RuntimeError, OSError, ValueError) as err:
            if pretrained and Path(pretrained).exists():
                raise
            raise WeightsNotFoundError(
                f"open_clip weights '{model_name}' / '{pretrained}' were not found locally and could not be "
                f"downloaded; give reward.path as a local checkpoint file ({err})"
            ) from err
        self.model = freeze(model.to(device=device, dtype=dtype))
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"open_clip resize_mode {cfg['resize_mode']!r} is not supported; only 'shortest'")
        self.transform = clip_transform(size, cfg["mean"], cfg["std"])
        self.dtype = dtype
        if checkpointing:
            checkpoint_layers(self.model.visual.transformer.resblocks)
            checkpoint_layers(self.model.transformer.resblocks)

    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        self.model.load_state_dict(state_dict)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float()

    def image_embeds(self, images: Tensor) -> Tensor:
        return self.model.encode_image(self.transform(images).to(self.dtype)).float()

    def text_embeds(self, prompts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.model.logit_scale.device)).float()


def load_encoder(config: RewardConfig, device: torch.device, default_path: str, default_processor: str | None = None) -> Any:
    """The CLIP encoder a config names, loaded once per (weights, device, dtype)."""
    options = config.options
    path = config.path if config.path is not None else default_path
    dtype = DTYPES[config.dtype]
    ckpt = config.gradient_checkpointing
    if "model" in options or path.startswith("hf-hub:"):
        model_name = options.get("model", path)
        pretrained = path if "model" in options else None
        key = ("open_clip", model_name, pretrained, str(device), dtype, ckpt)
        return cached(key, lambda: OpenCLIP(model_name, pretrained, device, dtype, ckpt))
    processor = options.get("processor", default_processor)
    key = ("transformers_clip", path, processor, str(device), dtype, ckpt)
    return cached(key, lambda: TransformersCLIP(path, device, dtype, processor, ckpt))


@register("clip")
class CLIPScore(RewardModel):
    """``logit_scale.exp() * cos(image, text)`` per image-prompt pair (Radford et al. 2021's logits).

    Differentiable: preprocessing is tensor resize + crop + normalise (rewards/preprocess.py).
    """
    summary = "CLIP score: logit_scale * cos(image, prompt)"

    name = "clip"
    differentiable = True
    default_path = "openai/clip-vit-large-patch14"
    default_processor: str | None = None
    use_logit_scale = True

    def __init__(self, encoder: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(device, dtype)
        self.encoder = encoder

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> CLIPScore:
        check_options(config.name, config.options, ("model", "processor"))
        device = torch.device(device)
        encoder = load_encoder(config, device, cls.default_path, cls.default_processor)
        return cls(encoder, device, DTYPES[config.dtype])

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        cosine = (_unit(self.encoder.image_embeds(images)) * _unit(self.encoder.text_embeds(prompts))).sum(-1)
        return self.encoder.logit_scale * cosine if self.use_logit_scale else cosine
