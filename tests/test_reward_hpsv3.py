"""HPSv3 (rewards/hpsv3.py) on a tiny random Qwen2-VL saved as HPSv3 publishes its weights (one
safetensors file in transformers 4.45's names, embeddings resized for <|Reward|>, the ``rm_head``),
scored against the official path by hand: the processor on PIL images resized as qwen_vl_utils does,
the model's own forward with sequential positions, the head at the reward token."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.core.loading import WeightsNotFoundError
from genalign.rewards import load_reward
from genalign.rewards.hpsv3 import INSTRUCTION, REWARD_SUFFIX, HPSv3
from genalign.rewards.vlm import QwenPixels
from tests.test_reward_vlm import board_photo, random_images, save_tiny_qwen, to_pil

SIDE = 56  # min_pixels = max_pixels = 56 * 56: square images stay 56 x 56, 4 merged image tokens
OPTIONS = {"min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE}
PROMPTS = ["a red cube", "two green spheres on a wooden table"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base folder, HPSv3 checkpoint folder, reference model, reference head)."""
    from safetensors.torch import save_file
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from genalign.rewards.hpsv3 import reward_head

    base = save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen2-vl"), "qwen2_vl")
    tokenizer = AutoProcessor.from_pretrained(base).tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})  # hpsv3/train.py
    model = Qwen2VLForConditionalGeneration.from_pretrained(base).eval()
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(1)
    head = reward_head(model.config.text_config.hidden_size).eval()
    for layer in head:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.3)
    state = {}  # transformers 4.45's names, as in HPSv3.safetensors
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("model.visual."):
            key = key.removeprefix("model.")
        state[key] = value.contiguous().clone()
    state.update({f"rm_head.{k}": v.clone() for k, v in head.state_dict().items()})
    folder = tmp_path_factory.mktemp("tiny-hpsv3")
    save_file(state, str(folder / "HPSv3.safetensors"))
    return base, str(folder), model, head


def official(tiny, images: torch.Tensor, prompts: list[str], sequential: bool = True) -> torch.Tensor:
    """HPSv3's mu the published way: PIL image, the processor with the instruction and the reward
    token, right padding, the VLM's forward with plain positions, the head at <|Reward|>."""
    from transformers import AutoProcessor

    base, _, model, head = tiny
    processor = AutoProcessor.from_pretrained(base)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    messages = [[{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": INSTRUCTION.format(text_prompt=p) + REWARD_SUFFIX}]}] for p in prompts]
    texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=texts, images=[to_pil(image) for image in images], padding=True, padding_side="right",
                       return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length).view(1, 1, -1).expand(3, len(prompts), -1) if sequential else None
    with torch.no_grad():
        hidden = model.model(**inputs, position_ids=positions).last_hidden_state
        at = inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
        return head(hidden[at])[:, 0]


def test_instruction_is_the_published_text_byte_for_byte():
    # sha256 / lengths of INSTRUCTION and prompt_with_special_token in MizzenAI/HPSv3
    # hpsv3/dataset/data_collator_qwen.py (commit 77e8fa3)
    assert len(INSTRUCTION) == 2523
    assert hashlib.sha256(INSTRUCTION.encode()).hexdigest() == (
        "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a")
    assert len(REWARD_SUFFIX) == 67
    assert hashlib.sha256(REWARD_SUFFIX.encode()).hexdigest() == (
        "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a")


def test_score_is_the_official_mu(tiny):
    base, folder, _, _ = tiny
    reward = load_reward(RewardConfig(name="hpsv3", path=folder, options={"base": base, **OPTIONS}))
    assert isinstance(reward, HPSv3)
    images = random_images(2, (SIDE, SIDE), seed=3)
    expected = official(tiny, images, PROMPTS)
    with torch.no_grad():
        scores, subs = reward(images, PROMPTS)
        alone = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1])[0] for i in range(2)])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone, scores, atol=1e-4, rtol=1e-4)  # right padding leaves each row's score alone
    assert set(subs) == {"hpsv3"}
    # Qwen2-VL's 2-D image positions (transformers 5's default) would give another score
    assert (official(tiny, images, PROMPTS, sequential=False) - scores).abs().max() > 1e-3
    assert (scores[0] - reward(images[:1], PROMPTS[1:])[0][0]).abs() > 1e-4  # the prompt matters


def test_gradients_reach_the_pixels(tiny):
    base, folder, _, _ = tiny
    reward = load_reward(RewardConfig(name="hpsv3", path=folder, options={"base": base, **OPTIONS},
                                      gradient_checkpointing=True))
    images = random_images(2, (SIDE, SIDE), seed=4).requires_grad_(True)
    scores, _ = reward(images, PROMPTS)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_preprocessing_matches_pil_resize_then_the_processor_on_a_photo():
    """hpsv3: qwen_vl_utils resizes the PIL image (bicubic) to smart_resize(min = max = 200704), the
    processor keeps that size; ours resizes the tensor once."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    photo, image = board_photo()
    height, width = smart_resize(photo.height, photo.width, factor=28, min_pixels=200704, max_pixels=200704)
    processor = Qwen2VLImageProcessor()  # Qwen2-VL-7B-Instruct's bounds: 3136 .. 12845056 pixels
    official_inputs = processor(images=[photo.resize((width, height), Image.BICUBIC)], return_tensors="pt")
    ours, tokens = QwenPixels.from_processor(type("P", (), {"image_processor": processor}), 200704, 200704)([image])
    assert torch.equal(ours["image_grid_thw"], official_inputs["image_grid_thw"])
    error = (ours["pixel_values"] - official_inputs["pixel_values"]).abs()
    assert error.max() < 0.05 and error.mean() < 0.006, (error.max(), error.mean())
    assert tokens == [height * width // 28 // 28]


def test_loading_errors(tiny, tmp_path):
    base, folder, _, _ = tiny
    with pytest.raises(WeightsNotFoundError, match="HPSv3.safetensors"):
        load_reward(RewardConfig(name="hpsv3", path=str(tmp_path), options={"base": base}))
    with pytest.raises(WeightsNotFoundError, match="genalign-test/no-such-base"):
        load_reward(RewardConfig(name="hpsv3", path=folder, options={"base": "genalign-test/no-such-base"}))
    with pytest.raises(ValueError, match="unknown option"):
        load_reward(RewardConfig(name="hpsv3", path=folder, options={"base": base, "temperature": 1}))
    other = save_tiny_qwen(tmp_path / "qwen2.5", "qwen2_5_vl")
    with pytest.raises(ConfigError, match="qwen2_5_vl"):
        load_reward(RewardConfig(name="hpsv3", path=folder, options={"base": other}))
