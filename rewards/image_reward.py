"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"): a BLIP ViT-L/16 encodes the image, a BERT-base text encoder reads the
prompt while cross-attending to the image's patch embeddings, an MLP maps the text encoder's [CLS]
state to one number, normalised by the training set's mean and std:
``score = (mlp(cls) - 0.16717362830052426) / 1.0333394966054072``.

Config: ``{name: image_reward}`` loads ``ImageReward.pt`` of the hub repo ``THUDM/ImageReward``;
``path`` may instead be a local ``.pt`` / ``.safetensors`` file or a folder holding
``ImageReward.pt``. Options: ``tokenizer`` (default ``bert-base-uncased``, a hub id or folder),
``vision_config`` / ``text_config`` (dicts overriding transformers ``BlipVisionConfig`` /
``BlipTextConfig`` fields; the defaults are the published ViT-L/16 at 224 px and BERT-base).

The official package (``image-reward``) builds the model from BLIP's own ``vit.py`` (timm,
fairscale) and ``med.py``, which do not install cleanly next to current transformers. The same
network is built here from transformers' ``BlipVisionModel`` and ``BlipTextModel``, which were
ported from those two files; :func:`convert_image_reward_state_dict` renames the official
checkpoint's keys to these modules (the ViT renames are those of transformers'
``models/blip/convert_blip_original_pytorch_to_hf.py``; the text encoder's names are med.py's own).

Checked against THUDM/ImageReward ``ImageReward/ImageReward.py``, ``utils.py`` and
``models/BLIP/{blip,blip_pretrain,vit,med}.py``:

- images: ``Resize(224, bicubic)`` of the shortest side, ``CenterCrop(224)``, OpenAI CLIP
  normalisation, in the PIL scorer and in ReFL's tensor path alike (not BLIP's square resize; for
  square generations the two coincide);
- prompts: ``bert-base-uncased`` plus BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens, padded and
  truncated to 35 tokens; ``[CLS]`` stays the first token (ImageReward never swaps in ``[ENC]``,
  unlike BLIP's ITM head), all image tokens are attended;
- the checkpoint is a plain state dict of the ``ImageReward`` module (``blip.visual_encoder.*``,
  ``blip.text_encoder.*``, ``mlp.layers.*``, and the unused ``blip.vision_proj`` /
  ``blip.text_proj``), loaded by the official code with ``torch.load`` + ``strict=False``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genalign.core.experiment import RewardConfig
from genalign.core.loading import from_pretrained_or_explain, resolve_file
from genalign.rewards import register
from genalign.rewards.base import (
    DTYPES,
    Metadata,
    PreferenceMLP,
    RewardModel,
    cached,
    checkpoint_layers,
    freeze,
    load_checkpoint,
)
from genalign.rewards.preprocess import ImageTransform

DEFAULT_PATH = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
DEFAULT_TOKENIZER = "bert-base-uncased"
MAX_PROMPT_TOKENS = 35
# ImageReward.py: rewards = (rewards - self.mean) / self.std
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072

# BLIP's create_vit("large", 224): width 1024, depth 24, 16 heads, mlp_ratio 4, qkv bias, LayerNorm eps 1e-6
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
}
# ImageReward's med_config.json (BERT-base + 2 added tokens); encoder_hidden_size follows the ViT width.
# transformers builds the cross-attention layers only when is_decoder is set; the forward pass
# still uses the bidirectional mask (BlipTextModel.forward's is_decoder=False).
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "pad_token_id": 0, "is_decoder": True,
}
OPTIONS = ("tokenizer", "vision_config", "text_config")


ImageRewardHead = PreferenceMLP  # the aesthetic predictor's MLP, keys included (rewards/base.py)


class ImageRewardModel(nn.Module):
    """ViT image encoder -> text encoder cross-attending to it -> MLP on [CLS] -> normalised score."""

    def __init__(self, vision_config: Any, text_config: Any):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_model = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = ImageRewardHead(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """pixel_values (B, 3, S, S) normalised, input_ids / attention_mask (B, T) -> scores (B,) fp32."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, Dv)
        text = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                               encoder_hidden_states=image_embeds).last_hidden_state  # (B, T, Dt)
        raw = self.mlp(text[:, 0].float()).squeeze(-1)  # (B,); the official code also runs the MLP in fp32
        return (raw - SCORE_MEAN) / SCORE_STD


def image_reward_configs(vision: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig): the published architecture with ``vision`` / ``text`` overrides."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision_config = BlipVisionConfig(**{**VISION_DEFAULTS, **(vision or {})})
    text_fields = {**TEXT_DEFAULTS, "encoder_hidden_size": vision_config.hidden_size, **(text or {})}
    return vision_config, BlipTextConfig(**text_fields)


def build_image_reward_model(vision: Mapping[str, Any] | None = None,
                             text: Mapping[str, Any] | None = None) -> ImageRewardModel:
    """A randomly initialised ImageReward network (weights come from a checkpoint)."""
    return ImageRewardModel(*image_reward_configs(vision, text))


def image_reward_transform(image_size: int = 224) -> ImageTransform:
    """ImageReward's ``_transform(224)``: bicubic shortest-side resize, center crop, CLIP normalisation."""
    return ImageTransform(image_size, (image_size, image_size))


# BLIP ViT (timm names, after ``blip.visual_encoder.``) -> BlipVisionModel (after ``vision_model.``)
_VISION_RENAMES = (
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
)
# in the checkpoint but not on the scoring path: BLIP's contrastive projections, and med.py's
# position_ids buffer (transformers recomputes it, non-persistent)
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _convert_key(key: str) -> str | None:
    if key.startswith("blip.visual_encoder."):
        rest = key.removeprefix("blip.visual_encoder.")
        for pattern, replacement in _VISION_RENAMES:
            match = re.fullmatch(pattern, rest)
            if match:
                return "vision_model." + match.expand(replacement)
        return None
    if key.startswith("blip.text_encoder."):  # med.py's BertModel names == BlipTextModel's
        return "text_model." + key.removeprefix("blip.text_encoder.")
    if re.fullmatch(r"mlp\.layers\.\d+\.(weight|bias)", key):
        return key
    return None


def convert_image_reward_state_dict(original: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The official ``ImageReward.pt`` state dict -> :class:`ImageRewardModel`'s.

    Keys off the scoring path (``_UNUSED``) are dropped; any other key that is not part of the
    official layout is an error, so a wrong file fails here rather than scoring with random weights.
    """
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, value in original.items():
        if key.startswith(_UNUSED):
            continue
        new_key = _convert_key(key)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise ValueError(f"not an ImageReward checkpoint: {len(unknown)} unexpected key(s), e.g. {sorted(unknown)[:5]}")
    return converted


def load_tokenizer(path: str) -> Any:
    """BERT's tokenizer with BLIP's added tokens (``blip.init_tokenizer``): ``[DEC]`` as bos and
    ``[ENC]``, ids 30522 and 30523 of bert-base-uncased, hence the text encoder's 30524 rows."""
    from transformers import BertTokenizer

    tokenizer = from_pretrained_or_explain(
        BertTokenizer, path, hint="Set reward.options.tokenizer to a local bert-base-uncased folder"
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_image_reward(checkpoint: Path, vision: Mapping[str, Any], text: Mapping[str, Any],
                      device: torch.device, dtype: torch.dtype, checkpointing: bool = False) -> ImageRewardModel:
    """The frozen network with the checkpoint's weights (strict: every weight must be there)."""
    model = build_image_reward_model(vision, text)
    model.load_state_dict(convert_image_reward_state_dict(load_checkpoint(checkpoint)), strict=True)
    model = freeze(model).to(device=device, dtype=dtype)
    model.mlp.float()
    if checkpointing:
        checkpoint_layers(model.vision_model.encoder.layers)
        checkpoint_layers(model.text_model.encoder.layer)
    return model


@register("image_reward")
class ImageRewardScore(RewardModel):
    """ImageReward's normalised score per image-prompt pair (higher: more preferred by people).

    Differentiable: preprocessing is tensor resize + crop + normalise (rewards/preprocess.py).
    """
    summary = "ImageReward human preference score (BLIP), normalised"

    name = "image_reward"
    differentiable = True

    def __init__(self, model: ImageRewardModel, tokenizer: Any, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(device, dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.transform = image_reward_transform(model.vision_model.config.image_size)

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> ImageRewardScore:
        options = config.options
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"reward {config.name}: unknown option(s) {sorted(unknown)}; known: {', '.join(OPTIONS)}")
        device, dtype = torch.device(device), DTYPES[config.dtype]
        checkpoint = resolve_file(config.path or DEFAULT_PATH, CHECKPOINT_FILE,
                                  hint=f"Download {CHECKPOINT_FILE} of {DEFAULT_PATH} or set reward.path to it")
        tokenizer_path = str(options.get("tokenizer", DEFAULT_TOKENIZER))
        vision, text = dict(options.get("vision_config", {})), dict(options.get("text_config", {}))

        def build() -> tuple[ImageRewardModel, Any]:
            tokenizer = load_tokenizer(tokenizer_path)
            model = load_image_reward(checkpoint, vision, text, device, dtype, config.gradient_checkpointing)
            if len(tokenizer) > model.text_model.config.vocab_size:
                raise ValueError(f"the tokenizer '{tokenizer_path}' has {len(tokenizer)} tokens with BLIP's [DEC] "
                                 f"and [ENC], the text encoder only {model.text_model.config.vocab_size}")
            return model, tokenizer

        key = ("image_reward", str(checkpoint.resolve()), tokenizer_path, json.dumps(vision, sort_keys=True),
               json.dumps(text, sort_keys=True), str(device), dtype, config.gradient_checkpointing)
        model, tokenizer = cached(key, build)
        return cls(model, tokenizer, device, dtype)

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        pixels = self.transform(images).to(self.dtype)  # (B, 3, 224, 224)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        return self.model(pixels, tokens.input_ids, tokens.attention_mask)
