"""UnifiedReward (rewards/unified_reward.py): its published prompts byte for byte, the parsers on
replies worked by hand, and on tiny random Qwen2.5-VL / LLaVA checkpoints: the greedy reply of the
official processor + generate path, the expected score and the pairwise probability computed by
hand from the official processor and forward."""

from __future__ import annotations

import hashlib

import pytest
import torch

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.rewards import load_reward
from genalign.rewards.unified_reward import (
    PAIR_TEMPLATE,
    TEMPLATES,
    UnifiedReward,
    UnifiedRewardPair,
    acs_scores,
    final_score,
    pair_verdict,
)
from tests.test_reward_vlm import NATIVE_QWEN, random_images, to_pil

PROMPTS = ["a red cube", "two green spheres on a wooden table"]


def test_prompts_are_the_published_ones_byte_for_byte():
    """sha256 of the published texts with {prompt} left in: UnifiedReward's
    qwen_point_score_image_generation.py, qwen_pair_rank_image_generation.py,
    UnifiedReward-2.0-inference/point_score_ACS_image_generation.py (CodeGoat24/UnifiedReward ff6f520),
    flow_grpo/rewards.py's question less its LLaVA "<image>\\n" (the chat template places the image)."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    assert digest(TEMPLATES["v1"]) == "f56f919ce3bc6aab3c173a5f836defe195e17e9614753e8b4c3dc2405bd4975b"
    assert digest(PAIR_TEMPLATE) == "0fd2f5c43a06516503fde3e64ffc98fff6f3a8815b5eac8dc5f0d81cee686614"
    assert digest(TEMPLATES["acs"]) == "75d52d3ae771f89b682db3b74cdaca1c7bde373a39162bc1c9dabd63cdc9b851"
    assert digest("<image>\n" + TEMPLATES["flow_grpo"]) == (
        "d68ab1dcf4dc3a39ec5dfab963d17fe30a6e5f713eb49f743ed88a4c8ce4317f")


def test_parsers_by_hand():
    assert final_score("cube (object): 1\ncolor red (attribute): 0\nFinal Score: 4") == 4.0
    assert final_score("Final Score:3.5 because") == 3.5
    assert final_score("Final Score: 7") == 0.0  # flow_grpo's regex reads 1-5 only
    assert final_score("I think it is a 4") == 0.0
    assert acs_scores("Alignment Score (1-5): 2.69\nCoherence Score (1-5): 4\nStyle Score (1-5): 3.5") == {
        "alignment": 2.69, "coherence": 4.0, "style": 3.5}
    assert acs_scores("Word Score (1-5): 3\nStyle Score (1-5): 1") == {"style": 1.0}
    assert pair_verdict("After comparing, Image 1 is better.") == 1.0
    assert pair_verdict("Image 2 is better. Image 1 is better in style") == 0.0  # the first verdict
    assert pair_verdict("Both images are equally good.") == 0.5
    assert pair_verdict("no idea") == 0.5


def official_generate(folder: str, questions: list[str], images: list[list[torch.Tensor]], tokens: int) -> list[str]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    replies = []
    for question, group in zip(questions, images):  # one at a time, as the published script
        content = [{"type": "image", "image": to_pil(image)} for image in group] + [{"type": "text", "text": question}]
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        replies.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    return replies


def official_next_token(folder: str, questions: list[str], images: list[list[torch.Tensor]], prefixes: list[str],
                        candidates: list[str]) -> torch.Tensor:
    """softmax over the candidates' tokens after the chat prompt and the prefix, by hand."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    ids = [processor.tokenizer.convert_tokens_to_ids(c) for c in candidates]
    rows = []
    for question, group, prefix in zip(questions, images, prefixes):
        content = [{"type": "image"}] * len(group) + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False) + prefix
        inputs = processor(text=[text], images=[to_pil(image) for image in group], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        rows.append(logits.log_softmax(-1)[ids].softmax(-1))
    return torch.stack(rows)


def test_parse_reads_the_official_greedy_reply(checkpoints):
    folder = checkpoints("qwen2_5_vl")
    images = random_images(2, NATIVE_QWEN, seed=11)
    expected = official_generate(folder, [TEMPLATES["v1"].replace("{prompt}", p) for p in PROMPTS],
                                 [[image] for image in images], tokens=8)
    reward = load_reward(RewardConfig(name="unified_reward", path=folder, options={"max_new_tokens": 8}))
    assert isinstance(reward, UnifiedReward) and not reward.differentiable
    assert reward.replies(images, PROMPTS, None) == expected
    assert all(expected)
    scores, _ = reward(images, PROMPTS)
    assert scores.tolist() == [final_score(reply) for reply in expected]


def test_acs_weights_and_missing_dimensions(checkpoints, monkeypatch):
    reward = load_reward(RewardConfig(name="unified_reward", path=checkpoints("qwen2_5_vl"),
                                      options={"template": "acs", "weights": {"alignment": 1.4, "style": 0.7}}))
    replies = ["Alignment Score (1-5): 4\nCoherence Score (1-5): 5\nStyle Score (1-5): 2",
               "Alignment Score (1-5): 2.5\nno style given"]
    monkeypatch.setattr(reward, "replies", lambda images, prompts, metadata: replies)
    scores, subs = reward(random_images(2, NATIVE_QWEN, seed=1), PROMPTS)
    # the second reply's style takes the batch's mean of the parsed styles (2); coherence has weight 0
    expected = [(1.4 * 4 + 0.7 * 2) / 2.1, (1.4 * 2.5 + 0.7 * 2) / 2.1]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert subs["unified_reward_style"].tolist() == [2.0, 2.0]
    assert subs["unified_reward_coherence"].tolist() == [5.0, 5.0]


def test_expected_score_is_the_digit_distribution_after_final_score(checkpoints):
    folder = checkpoints("qwen2_5_vl")
    images = random_images(2, NATIVE_QWEN, seed=12)
    reward = load_reward(RewardConfig(name="unified_reward", path=folder,
                                      options={"template": "flow_grpo", "scoring": "expected", "max_new_tokens": 6}))
    questions = [TEMPLATES["flow_grpo"].replace("{prompt}", p) for p in PROMPTS]
    replies = official_generate(folder, questions, [[image] for image in images], tokens=6)
    assert not any("Final Score:" in reply for reply in replies)  # a random model: the marker is appended
    prefixes = [reply.rstrip() + "\nFinal Score: " for reply in replies]
    weights = official_next_token(folder, questions, [[image] for image in images], prefixes, list("12345"))
    scores, _ = reward(images, PROMPTS)
    torch.testing.assert_close(scores, weights @ torch.arange(1.0, 6.0), atol=1e-4, rtol=0)
    assert ((scores > 1) & (scores < 5)).all()


def test_pairwise_verdict_and_probability(checkpoints):
    folder = checkpoints("qwen2_5_vl")
    images = random_images(2, NATIVE_QWEN, seed=13)
    references = random_images(2, NATIVE_QWEN, seed=14)
    metadata = [{"reference_image": reference} for reference in references]
    groups = [[images[i], references[i]] for i in range(2)]
    questions = [PAIR_TEMPLATE.replace("{prompt}", p) for p in PROMPTS]

    parse = load_reward(RewardConfig(name="unified_reward_pair", path=folder, options={"max_new_tokens": 8}))
    assert isinstance(parse, UnifiedRewardPair) and not parse.differentiable
    replies = official_generate(folder, questions, groups, tokens=8)
    assert parse.replies(images, PROMPTS, metadata) == replies
    assert parse(images, PROMPTS, metadata)[0].tolist() == [pair_verdict(reply) for reply in replies]

    expected = load_reward(RewardConfig(name="unified_reward_pair", path=folder, options={"scoring": "expected"}))
    assert expected.differentiable
    reference = official_next_token(folder, questions, groups, ["Image "] * 2, ["1", "2"])[:, 0]
    pixels = images.clone().requires_grad_(True)
    scores, _ = expected(pixels, PROMPTS, metadata)
    torch.testing.assert_close(scores.detach(), reference, atol=1e-4, rtol=0)
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reference_image"):
        expected(images, PROMPTS)


def test_config_errors(checkpoints):
    folder = checkpoints("qwen2_5_vl")
    with pytest.raises(ConfigError, match="reward.path"):
        load_reward(RewardConfig(name="unified_reward"))
    with pytest.raises(ConfigError, match="template"):
        load_reward(RewardConfig(name="unified_reward", path=folder, options={"template": "v3"}))
    with pytest.raises(ConfigError, match="acs"):
        load_reward(RewardConfig(name="unified_reward", path=folder, options={"template": "acs",
                                                                              "scoring": "expected"}))
    with pytest.raises(ConfigError, match="weights"):
        load_reward(RewardConfig(name="unified_reward", path=folder, options={"weights": {"beauty": 1}}))
    with pytest.raises(ValueError, match="unknown option"):
        load_reward(RewardConfig(name="unified_reward_pair", path=folder, options={"template": "acs"}))
    with pytest.raises(ConfigError, match="Qwen2-VL"):
        load_reward(RewardConfig(name="unified_reward_pair", path=checkpoints("llava")))
