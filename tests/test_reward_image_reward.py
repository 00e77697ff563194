"""ImageReward adapter: a tiny random network saved in the official checkpoint layout must load
through the same path as ``THUDM/ImageReward`` and score exactly as its transformers modules
called by hand; gradients reach the pixels; preprocessing matches the official PIL pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.core.experiment import RewardConfig
from genalign.core.loading import WeightsNotFoundError
from genalign.rewards import load_reward
from genalign.rewards.image_reward import (
    CHECKPOINT_FILE,
    ImageRewardScore,
    build_image_reward_model,
    convert_image_reward_state_dict,
    image_reward_configs,
    image_reward_transform,
)
from genalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform

BOARD = "tests/data/board.jpg"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "on", "the", "blue", "ball"]
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8}
# + [DEC] and [ENC]; no bos/eos/sep ids outside the tiny vocabulary
TINY_TEXT = {"vocab_size": len(VOCAB) + 2, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 40,
             "bos_token_id": None, "eos_token_id": None, "sep_token_id": None}
OFFICIAL_EXTRAS = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                   "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids")


def to_official(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in ImageReward.pt's layout, written out from BLIP's vit.py / med.py names
    (independently of the adapter's table), plus the keys the official checkpoint carries unused."""
    vision_names = [("embeddings.patch_embedding.", "patch_embed.proj."), ("encoder.layers.", "blocks."),
                    ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"),
                    ("self_attn.projection", "attn.proj"), ("post_layernorm", "norm")]
    official = {}
    for key, value in ours.items():
        if key.startswith("vision_model."):
            rest = key.removeprefix("vision_model.")
            rest = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed"}.get(rest, rest)
            for new, old in vision_names:
                rest = rest.replace(new, old)
            official["blip.visual_encoder." + rest] = value
        elif key.startswith("text_model."):
            official["blip.text_encoder." + key.removeprefix("text_model.")] = value
        else:
            official[key] = value  # mlp.layers.*
    vision_width, text_width = TINY_VISION["hidden_size"], TINY_TEXT["hidden_size"]
    official["blip.vision_proj.weight"], official["blip.vision_proj.bias"] = torch.randn(256, vision_width), torch.zeros(256)
    official["blip.text_proj.weight"], official["blip.text_proj.bias"] = torch.randn(256, text_width), torch.zeros(256)
    official["blip.text_encoder.embeddings.position_ids"] = torch.arange(TINY_TEXT["max_position_embeddings"])[None]
    return official


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference network, RewardConfig loading its official-layout checkpoint + a tiny BERT vocab)."""
    torch.manual_seed(0)
    reference = build_image_reward_model(TINY_VISION, TINY_TEXT).eval()
    with torch.no_grad():  # transformers' init leaves the ViT near zero: make every weight matter
        for name, param in reference.named_parameters():
            if param.ndim > 1:
                fan_in = param[0].numel() if param.ndim == 4 else param.shape[-1]
                param.normal_(0.0, 1.0 / math.sqrt(fan_in))
            elif "norm" in name.lower() and name.endswith("weight"):
                param.normal_(1.0, 0.2)
            else:
                param.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("image_reward")
    torch.save(to_official(reference.state_dict()), folder / CHECKPOINT_FILE)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    config = RewardConfig(name="image_reward", path=str(folder), options={
        "tokenizer": str(folder / "tokenizer"), "vision_config": TINY_VISION, "text_config": TINY_TEXT})
    return reference, config


def test_score_equals_the_modules_called_by_hand(tiny):
    reference, config = tiny
    reward = ImageRewardScore.from_config(config)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # model size: no resize
    prompts = ["a red cube", "The blue ball on a red cube"]
    scores, sub_scores = reward(images, prompts)

    # [CLS]=2 first (ImageReward keeps it, no [ENC]), [SEP]=3, [PAD]=0 up to 35 tokens
    ids = [[2, 5, 6, 7, 3], [2, 9, 10, 11, 8, 5, 6, 7, 3]]
    input_ids = torch.tensor([row + [0] * (35 - len(row)) for row in ids])
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image_embeds = reference.vision_model(pixel_values=(images - mean) / std).last_hidden_state
        text = reference.text_model(input_ids=input_ids, attention_mask=(input_ids != 0).long(),
                                    encoder_hidden_states=image_embeds).last_hidden_state
        expected = (reference.mlp(text[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072

    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert abs(scores[0] - scores[1]) > 0.1  # the tiny network is not degenerate
    assert set(sub_scores) == {"image_reward"}
    assert reward.tokenizer.bos_token == "[DEC]" and reward.tokenizer.bos_token_id == len(VOCAB)
    assert reward.tokenizer.convert_tokens_to_ids("[ENC]") == len(VOCAB) + 1


def test_conversion_maps_every_official_key_once(tiny):
    reference, _ = tiny
    official = to_official(reference.state_dict())
    converted = convert_image_reward_state_dict(official)

    assert len(converted) == len(official) - len(OFFICIAL_EXTRAS)  # no two keys land on one
    fresh = build_image_reward_model(TINY_VISION, TINY_TEXT)
    assert set(converted) == set(fresh.state_dict())
    fresh.load_state_dict(converted, strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    with pytest.raises(ValueError, match="blip.itm_head.weight"):
        convert_image_reward_state_dict({**official, "blip.itm_head.weight": torch.zeros(2, 32)})


def test_gradients_reach_the_pixels_with_and_without_checkpointing(tiny):
    _, config = tiny
    grads = []
    for checkpointing in (False, True):
        config_ckpt = RewardConfig(name=config.name, path=config.path, options=config.options,
                                   gradient_checkpointing=checkpointing)
        reward = ImageRewardScore.from_config(config_ckpt)
        images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2)).requires_grad_()
        scores, _ = reward(images, ["a red cube", "a blue ball"])
        scores.sum().backward()
        grads.append(images.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_bfloat16_weights_score_close_to_float32(tiny):
    _, config = tiny
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red cube", "a blue ball"]
    fp32, _ = ImageRewardScore.from_config(config)(images, prompts)
    bf16_reward = ImageRewardScore.from_config(RewardConfig(name=config.name, path=config.path,
                                                            options=config.options, dtype="bfloat16"))
    bf16, _ = bf16_reward(images, prompts)
    assert bf16_reward.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)  # measured: at most 0.02 apart


def test_preprocessing_matches_the_official_pil_pipeline():
    """ImageReward's _transform(224) on PIL vs ours on the float tensor, on a real 360x238 photo.

    Measured: mean |diff| 0.0046, max 0.048 in normalised units (max ~3/255 in pixel units): PIL
    resizes in 8 bit with fixed-point weights and rounds between its two separable passes, torch's
    antialiased bicubic stays in float. Asserted with ~2x headroom (mean < 0.01, max < 0.1); a crop
    one pixel off gives mean 0.24, max 2.2, and BLIP's square resize a mean of 0.6.
    """
    from torchvision import transforms

    photo = Image.open(BOARD).convert("RGB")
    official = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])(photo)
    pixels = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255  # (1, 3, 238, 360)
    ours = image_reward_transform()(pixels)[0]

    assert ours.shape == official.shape == (3, 224, 224)
    diff = (ours - official).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1, (float(diff.mean()), float(diff.max()))
    # BLIP's square resize (no crop) would be a different picture of a non-square photo
    squashed = ImageTransform((224, 224), None)(pixels)[0]
    assert (squashed - official).abs().mean() > 0.1


def test_default_architecture_is_vit_large_and_bert_base():
    vision, text = image_reward_configs()
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size, vision.layer_norm_eps) == (1024, 24, 16, 4096, 224, 16, 1e-6)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
            text.vocab_size, text.encoder_hidden_size, text.layer_norm_eps) == (768, 12, 12, 3072, 30524, 1024, 1e-12)
    assert image_reward_transform() == ImageTransform(224, (224, 224))


def test_missing_checkpoint_names_the_path(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # a cached copy must not hide the error
    for path in (None, "genalign-tests/no-such-image-reward", str(tmp_path / "nowhere" / CHECKPOINT_FILE)):
        with pytest.raises(WeightsNotFoundError, match=str(path or "THUDM/ImageReward")):
            ImageRewardScore.from_config(RewardConfig(name="image_reward", path=path))
    with pytest.raises(WeightsNotFoundError, match=CHECKPOINT_FILE):  # a folder without the file
        ImageRewardScore.from_config(RewardConfig(name="image_reward", path=str(tmp_path)))


def test_selectable_by_name(tiny):
    _, config = tiny
    reward = load_reward(RewardConfig(name="image_reward", path=config.path, options=config.options))
    assert isinstance(reward, ImageRewardScore)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(reward(images, ["a cube"])[0], ImageRewardScore.from_config(config)(images, ["a cube"])[0])
    with pytest.raises(ValueError, match="max_length"):
        load_reward(RewardConfig(name="image_reward", path=config.path, options={"max_length": 77}))


def test_a_local_safetensors_file_loads_the_same_weights(tiny, tmp_path):
    from safetensors.torch import save_file

    reference, config = tiny
    file = tmp_path / "image_reward.safetensors"
    save_file(to_official(reference.state_dict()), str(file))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompts = ["a red cube", "a blue ball"]
    from_file = ImageRewardScore.from_config(RewardConfig(name="image_reward", path=str(file), options=config.options))
    torch.testing.assert_close(from_file(images, prompts)[0], ImageRewardScore.from_config(config)(images, prompts)[0])
