"""The OCR reward (rewards/ocr.py): flow_grpo's edit-distance formula on values worked by hand, and
GOT-OCR 2.0 on a tiny random checkpoint (the real config, processor and tokenizer classes, saved and
loaded as a hub folder) against its official processor + generate / loss path."""

from __future__ import annotations

import pytest
import torch

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.core.loading import WeightsNotFoundError
from genalign.rewards import load_reward
from genalign.rewards.base import RewardInputError
from genalign.rewards.ocr import OCRReward, edit_distance_reward, quoted_text
from tests.test_reward_vlm import board_photo, random_images, tiny_tokenizer, to_pil

GOT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]
SIZE = 64  # the tiny vision tower's input: 64 / 16 patches / 4 = one image token
PROMPTS = ['a neon sign that says "Open 24h"', 'a wooden board reading "Hello" on a wall']


def test_edit_distance_reward_by_hand():
    assert edit_distance_reward("hello", "hello") == 1.0
    assert edit_distance_reward("Sign: HELLO world!!", "hello") == 1.0  # a substring after dropping spaces and case
    assert edit_distance_reward("helo", "hello") == pytest.approx(1 - 1 / 5)  # one deletion
    assert edit_distance_reward("Open 2 4 h", "open 24h") == 1.0
    assert edit_distance_reward("opem24k", "Open 24h") == pytest.approx(1 - 2 / 7)  # two substitutions, 7 characters
    assert edit_distance_reward("", "hello") == 0.0
    assert edit_distance_reward("xxxxxxxxxxxxxxxx", "hello") == 0.0  # distance 16 clipped to len 5
    with pytest.raises(RewardInputError):
        edit_distance_reward("abc", "  ")


def test_quoted_text():
    assert quoted_text(PROMPTS[0]) == "Open 24h"
    assert quoted_text('say "a" and "b"') == "a"  # the first pair, as flow_grpo
    for prompt in ("no quotes here", 'one " quote', 'empty "" quotes'):
        with pytest.raises(RewardInputError, match="double quotes"):
            quoted_text(prompt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2ImageProcessor, GotOcr2Processor

    tokenizer = tiny_tokenizer(GOT_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = tokenizer.convert_tokens_to_ids
    config = GotOcr2Config(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIZE, patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=64,
                           initializer_range=0.2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"), initializer_range=0.2),
        image_token_index=ids("<imgpad>"), image_seq_length=1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-got-ocr2")
    GotOcr2ForConditionalGeneration(config).save_pretrained(folder)
    GotOcr2Processor(image_processor=GotOcr2ImageProcessor(size={"height": SIZE, "width": SIZE}),
                     tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def official_inputs(folder: str, images: torch.Tensor):
    from transformers import AutoProcessor, GotOcr2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = GotOcr2ForConditionalGeneration.from_pretrained(folder).eval()
    inputs = processor(images=[to_pil(image) for image in images], return_tensors="pt", num_image_tokens=1)
    return processor, model, inputs


def test_edit_distance_scores_the_official_reading(folder):
    images = random_images(2, (SIZE, SIZE), seed=1)
    processor, model, inputs = official_inputs(folder, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False,
                             eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    expected_text = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    reward = load_reward(RewardConfig(name="ocr", path=folder, options={"max_new_tokens": 12}))
    assert isinstance(reward, OCRReward) and not reward.differentiable
    assert reward.ocr.read(images, 12) == expected_text
    assert any(text for text in expected_text)  # a random model still reads something
    # its readings as targets: a perfect score; the prompts' texts: flow_grpo's formula on the reading
    scores, subs = reward(images, PROMPTS, [{"text": text} for text in expected_text])
    assert scores.tolist() == [1.0, 1.0] and set(subs) == {"ocr"}
    scores, _ = reward(images, PROMPTS)
    assert scores.tolist() == [edit_distance_reward(t, q) for t, q in zip(expected_text, ["Open 24h", "Hello"])]


def test_likelihood_is_the_official_teacher_forced_probability(folder):
    images = random_images(2, (SIZE, SIZE), seed=2)
    processor, model, inputs = official_inputs(folder, images)
    expected = []
    for row, text in enumerate(["Open 24h", "Hello"]):  # HF's own loss over the answer tokens and <|im_end|>
        answer = processor.tokenizer(text + "<|im_end|>", add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([inputs["input_ids"][row : row + 1], answer], 1)
        labels = ids.clone()
        labels[:, : inputs["input_ids"].shape[1]] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, pixel_values=inputs["pixel_values"][row : row + 1], labels=labels).loss
        expected.append(-loss)
    expected = torch.stack(expected)
    reward = load_reward(RewardConfig(name="ocr", path=folder, options={"scoring": "likelihood", "output": "logprob"}))
    assert reward.differentiable
    with torch.no_grad():
        scores, _ = reward(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=2e-3, rtol=0)  # tensor resize vs the processor's uint8 one
    probs = load_reward(RewardConfig(name="ocr", path=folder, options={"scoring": "likelihood"}))
    pixels = random_images(2, (48, 80), seed=3).requires_grad_(True)  # another size: resized on the tensor
    scores, _ = probs(pixels, PROMPTS)
    assert ((scores > 0) & (scores <= 1)).all()
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_tensor_preprocessing_matches_the_image_processor_on_a_photo(folder, monkeypatch):
    from transformers import GotOcr2ImageProcessor

    photo, image = board_photo()
    reward = load_reward(RewardConfig(name="ocr", path=folder))
    monkeypatch.setattr(reward.ocr, "size", (1024, 1024))  # GOT-OCR-2.0-hf's input size (the model is shared)
    official = GotOcr2ImageProcessor(size={"height": 1024, "width": 1024})(images=[photo], return_tensors="pt")
    error = (reward.ocr.pixels(image[None]) - official["pixel_values"]).abs()
    assert error.max() < 0.03 and error.mean() < 0.006, (error.max(), error.mean())


def test_errors(folder, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="genalign-test/no-such-ocr"):
        load_reward(RewardConfig(name="ocr", path="genalign-test/no-such-ocr"))
    with pytest.raises(ConfigError, match="scoring"):
        load_reward(RewardConfig(name="ocr", path=folder, options={"scoring": "cer"}))
    with pytest.raises(ConfigError, match="logprob"):
        load_reward(RewardConfig(name="ocr", path=folder, options={"output": "logprob"}))
    reward = load_reward(RewardConfig(name="ocr", path=folder))
    with pytest.raises(RewardInputError, match="double quotes"):
        reward(random_images(1, (SIZE, SIZE), seed=0), ["a sign with no text given"])
