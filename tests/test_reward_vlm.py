"""VLM rewards (rewards/vlm.py) on tiny random Qwen2-VL, Qwen2.5-VL and LLaVA checkpoints built
offline (tokenizer trained here, the real processor classes, save_pretrained), loaded through
``from_config`` as real weights are; their scores are checked against the official processor
plus a forward pass by hand, and the tensor preprocessing against the official image processors
on a real photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.core.loading import WeightsNotFoundError
from genalign.rewards import load_reward
from genalign.rewards.vlm import LlavaPixels, QwenPixels, VLMCompare, VQAScore

BOARD = Path(__file__).parent / "data" / "board.jpg"
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Qwen2-VL's chat layout, without the default system turn
QWEN_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaVA-1.5's layout (USER: <image>\n... ASSISTANT:); the tokenizer adds the BOS
LLAVA_CHAT = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PROMPTS = ["a red cube", "two green spheres on a wooden table", "a cat"]
NATIVE_QWEN = (56, 84)  # (H, W) the tiny Qwen processor keeps as is: multiples of 28, 4704 pixels
NATIVE_LLAVA = (30, 30)


def tiny_tokenizer(specials: list[str], bos: str | None = None, **tokens: str):
    """A byte-level BPE trained on the templates' words, specials and Yes / No as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        'Does this figure show "a red cube"? Please answer yes or no.',
        "Here are two images. Compared with the second image, is the first image better in terms of overall quality",
        " for the prompt two green spheres on a wooden table cat USER ASSISTANT user assistant",
    ] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.add_tokens(["Yes", "No"])
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, **tokens)


def save_tiny_qwen(folder: Path, family: str) -> str:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = tiny_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                initializer_range=0.2)
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=0.2)
    if family == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(embed_dim=32, hidden_size=32, mlp_ratio=2, **vision),
                               **tokens)
        model_class, processor_class = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:  # window attention over 2 x 2 merged tokens in block 0, full attention in block 1
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, out_hidden_size=32,
                                                 window_size=56, fullatt_block_indexes=[1], **vision), **tokens)
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=NATIVE_QWEN[0] * NATIVE_QWEN[1])
    processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                    chat_template=QWEN_CHAT).save_pretrained(folder)
    return str(folder)


def save_tiny_llava(folder: Path) -> str:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor

    tokenizer = tiny_tokenizer(LLAVA_SPECIALS, bos="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=NATIVE_LLAVA[0], patch_size=6, projection_dim=32,
                           initializer_range=0.2),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"),
                         pad_token_id=ids("<pad>"), initializer_range=0.2),
        image_token_id=ids("<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = LlavaImageProcessor(size={"shortest_edge": NATIVE_LLAVA[0]},
                                          crop_size={"height": NATIVE_LLAVA[0], "width": NATIVE_LLAVA[1]})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=6,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_CHAT).save_pretrained(folder)
    return str(folder)


def random_images(count: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """uint8-valued images (count, 3, H, W) in [0, 1], so that PIL sees exactly the same pixels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, *size), generator=generator).float() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())


def official_logprobs(folder: str, questions: list[str], images: list[list[torch.Tensor]]) -> torch.Tensor:
    """log P(Yes) by hand: the processor's own chat + image path on PIL images, the model's full
    forward, the log-softmax at the last position, one question at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    yes = processor.tokenizer.convert_tokens_to_ids("Yes")
    out = []
    for question, group in zip(questions, images):
        content = [{"type": "image", "image": to_pil(image)} for image in group] + [{"type": "text", "text": question}]
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits  # (1, L, V)
        out.append(logits[0, -1].log_softmax(-1)[yes])
    return torch.stack(out)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_score_is_p_yes_of_the_official_processor_and_forward(checkpoints, family):
    folder = checkpoints(family)
    size = NATIVE_LLAVA if family == "llava" else NATIVE_QWEN
    images = random_images(2, size, seed=1)
    prompts = PROMPTS[:2]
    # each family's published VQAScore question (t2v_metrics qwen2vl_model.py / llava_model.py)
    question = ('Does this figure show "{}"? Please answer yes or no.' if family == "llava"
                else 'Does this image show "{}"?')
    expected = official_logprobs(folder, [question.format(p) for p in prompts], [[image] for image in images])

    reward = load_reward(RewardConfig(name="vlm", path=folder, options={"output": "logprob"}))
    assert isinstance(reward, VQAScore) and reward.vlm.family == family
    assert reward.template.replace("{prompt}", "{}") == question
    with torch.no_grad():
        logprobs, subscores = reward(images, prompts)
        probs, _ = load_reward(RewardConfig(name="vlm", path=folder))(images, prompts)
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(probs, expected.exp(), atol=0, rtol=1e-4)
    assert torch.equal(subscores["vlm"], logprobs)
    # the scores depend on the image and the prompt well beyond the tolerance
    assert (expected[0] - expected[1]).abs() > 1e-2
    with torch.no_grad():
        swapped, _ = reward(images.flip(0), prompts)
    assert (swapped - logprobs).abs().max() > 1e-3


def test_sequence_scoring_is_llavas_published_vqascore(checkpoints):
    """scoring: sequence (t2v_metrics llava_model.py): the question, then " Yes</s>" after the
    generation prompt; the score is exp(-mean cross-entropy) over the answer's tokens, computed
    here with the processor and the model's full forward on PIL images, one at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = checkpoints("llava")
    images = random_images(2, NATIVE_LLAVA, seed=6)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    expected = []
    for image, prompt in zip(images, PROMPTS[:2]):
        question = f'Does this figure show "{prompt}"? Please answer yes or no.'
        chat = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": question}]}],
                                             add_generation_prompt=True, tokenize=False)
        prefix = processor(text=chat, images=to_pil(image), return_tensors="pt")
        inputs = processor(text=chat + " Yes</s>", images=to_pil(image), return_tensors="pt")
        n = inputs["input_ids"].shape[1] - prefix["input_ids"].shape[1]
        assert n >= 2  # the answer and the end of sequence
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        targets = inputs["input_ids"][0, -n:]
        expected.append(torch.nn.functional.cross_entropy(logits[-n - 1 : -1], targets).neg().exp())
    reward = load_reward(RewardConfig(name="vlm", path=folder, options={"scoring": "sequence"}))
    with torch.no_grad():
        scores, _ = reward(images, PROMPTS[:2])
        first_token, _ = load_reward(RewardConfig(name="vlm", path=folder))(images, PROMPTS[:2])
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=1e-4)
    assert (scores - first_token).abs().max() > 1e-4
    reward.vlm.tokenizer.padding_side = "left"  # the answer's positions are found whichever side pads
    with torch.no_grad():
        left, _ = reward(images, ["a cat", PROMPTS[1]])
        alone, _ = reward(images[:1], ["a cat"])
    reward.vlm.tokenizer.padding_side = "right"
    torch.testing.assert_close(left[1], scores[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left[0], alone[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="one answer string"):
        load_reward(RewardConfig(name="vlm", path=folder, options={"scoring": "sequence", "answer": ["Yes", "No"]}))
    with pytest.raises(ConfigError, match="scoring"):
        load_reward(RewardConfig(name="vlm", path=folder, options={"scoring": "all"}))
    with pytest.raises(ConfigError, match="LLaVA-1.5's published form"):
        load_reward(RewardConfig(name="vlm", path=checkpoints("qwen2_vl"), options={"scoring": "sequence"}))


def test_answer_option_sums_single_token_answers(checkpoints):
    folder = checkpoints("qwen2_vl")
    images = random_images(2, NATIVE_QWEN, seed=2)
    with torch.no_grad():
        yes, _ = load_reward(RewardConfig(name="vlm", path=folder))(images, PROMPTS[:2])
        no, _ = load_reward(RewardConfig(name="vlm", path=folder, options={"answer": "No"}))(images, PROMPTS[:2])
        both, _ = load_reward(RewardConfig(name="vlm", path=folder, options={"answer": ["Yes", "No"]}))(
            images, PROMPTS[:2])
    torch.testing.assert_close(both, yes + no, atol=0, rtol=1e-5)
    assert (yes - no).abs().min() > 1e-4
    with pytest.raises(ConfigError, match="single tokens"):
        load_reward(RewardConfig(name="vlm", path=folder, options={"answer": "Yes indeed"}))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_scores_equal_one_at_a_time(checkpoints, family, padding_side, monkeypatch):
    reward = load_reward(RewardConfig(name="vlm", path=checkpoints(family), options={"output": "logprob"}))
    monkeypatch.setattr(reward.vlm.tokenizer, "padding_side", padding_side)
    images = random_images(3, (70, 90), seed=3)  # resized by both processors
    with torch.no_grad():
        batched, _ = reward(images, PROMPTS)
        single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    assert batched.std() > 1e-3  # three different answers, not one repeated


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_gradients_reach_the_pixels_with_and_without_checkpointing(checkpoints, family):
    images = random_images(2, (70, 90), seed=4)
    grads, scores = [], []
    for checkpointing in (False, True):
        reward = load_reward(RewardConfig(name="vlm", path=checkpoints(family), gradient_checkpointing=checkpointing))
        pixels = images.clone().requires_grad_(True)
        score, _ = reward(pixels, PROMPTS[:2])
        score.sum().backward()
        grads.append(pixels.grad)
        scores.append(score.detach())
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert (grads[0][0].abs().sum() > 0) and (grads[0][1].abs().sum() > 0)  # each score reaches its own image
    torch.testing.assert_close(scores[1], scores[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def board_photo() -> tuple[Image.Image, torch.Tensor]:
    photo = Image.open(BOARD).convert("RGB")
    return photo, torch.from_numpy(np.array(photo)).permute(2, 0, 1).float() / 255  # (3, 238, 360)


# Parity bounds on the normalised pixels (|ours - processor|), measured on board.jpg: the
# processors resize uint8 images and round each of the two resize passes to integers, we keep
# floats (<= ~1.1 / 255 / std). Measured max / mean: Qwen2VLImageProcessor 0.0161 / 0.0045 at the
# default max_pixels (238x360 -> 224x364), 0.0135 / 0.0040 at 28*28*24; LLaVA / CLIP processors
# 0.0155 / 0.0045, with do_pad 0.0162 / 0.0030. The PIL backend of Qwen2-VL orders the passes
# differently for a shrink-one-side-grow-the-other resize: 0.0750 / 0.0045 there.
PARITY_MAX = 0.02
PARITY_MAX_QWEN_PIL = 0.08
PARITY_MEAN = 0.006


@pytest.mark.parametrize("max_pixels", [28 * 28 * 1280, 28 * 28 * 24])  # Qwen2-VL's default; a downscale
def test_qwen_preprocessing_matches_the_image_processor_on_a_photo(max_pixels):
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    photo, image = board_photo()
    ours, ours_tokens = QwenPixels.from_processor(
        type("Processor", (), {"image_processor": Qwen2VLImageProcessor(max_pixels=max_pixels)}))([image])
    assert ours["pixel_values"].requires_grad is False
    for processor_class in (Qwen2VLImageProcessor, Qwen2VLImageProcessorPil):
        official = processor_class(max_pixels=max_pixels)(images=[photo], return_tensors="pt")
        assert torch.equal(ours["image_grid_thw"], official["image_grid_thw"])
        assert ours["pixel_values"].shape == official["pixel_values"].shape
        error = (ours["pixel_values"] - official["pixel_values"]).abs()
        bound = PARITY_MAX_QWEN_PIL if processor_class is Qwen2VLImageProcessorPil else PARITY_MAX
        assert error.max() < bound and error.mean() < PARITY_MEAN, (processor_class, error.max(), error.mean())
    grid = official["image_grid_thw"][0]
    assert ours_tokens == [int(grid.prod()) // 4]


@pytest.mark.parametrize("do_pad", [False, True])
def test_llava_preprocessing_matches_the_image_processor_on_a_photo(do_pad):
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    photo, image = board_photo()
    size, crop = {"shortest_edge": 336}, {"height": 336, "width": 336}  # llava-1.5's CLIP ViT-L/14-336
    processors = [LlavaImageProcessor(size=size, crop_size=crop, do_pad=do_pad)]
    if not do_pad:
        processors.append(CLIPImageProcessor(size=size, crop_size=crop))  # llava-hf/llava-1.5-7b-hf's class
    for image_processor in processors:
        holder = type("Processor", (), {"image_processor": image_processor, "patch_size": 14,
                                        "num_additional_image_tokens": 1, "vision_feature_select_strategy": "default"})
        pixels = LlavaPixels.from_processor(holder)
        ours, tokens = pixels([image])
        official = image_processor(images=[photo], return_tensors="pt")["pixel_values"]
        assert ours["pixel_values"].shape == official.shape == (1, 3, 336, 336)
        assert tokens == [576]
        error = (ours["pixel_values"] - official).abs()
        assert error.max() < PARITY_MAX and error.mean() < PARITY_MEAN, (image_processor, error.max(), error.mean())


def test_score_on_a_resized_photo_given_the_processors_pixels_is_the_official_score(checkpoints):
    """On a real photo the tiny processor shrinks (238x360 -> 56x84): fed the image processor's own
    pixel_values, the reward's text + forward path gives the official log P(Yes); with its tensor
    preprocessing the gap is the pixel rounding of the parity test, amplified by a random model."""
    folder = checkpoints("qwen2_vl")
    photo, image = board_photo()
    question = 'Does this figure show "a cat"? Please answer yes or no.'
    expected = official_logprobs(folder, [question], [[image]])
    reward = load_reward(RewardConfig(name="vlm", path=folder, options={"output": "logprob", "template": question.replace(
        '"a cat"', '"{prompt}"')}))
    official = reward.vlm.processor.image_processor(images=[photo], return_tensors="pt")

    def official_pixels(images):
        inputs = {"pixel_values": official["pixel_values"], "image_grid_thw": official["image_grid_thw"]}
        return inputs, [int(official["image_grid_thw"].prod()) // 4]

    with torch.no_grad():
        given = reward.vlm.answer_logprobs([question], [[image]], official_pixels, reward.answer_ids)
        ours, _ = reward(image[None], ["a cat"])
    torch.testing.assert_close(given, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, expected, atol=0.02, rtol=0)  # measured 0.0062


def test_compare_score_is_p_yes_with_both_images(checkpoints):
    folder = checkpoints("qwen2_vl")
    images = random_images(2, NATIVE_QWEN, seed=5)
    references = [random_images(1, (28, 56), seed=6)[0], random_images(1, NATIVE_QWEN, seed=7)[0]]
    criterion = "photorealism"
    questions = [f"Here are two images. Compared with the second image, is the first image better in terms of "
                 f'{criterion} for the prompt "{p}"? Please answer yes or no.' for p in PROMPTS[:2]]
    expected = official_logprobs(folder, questions, [[images[i], references[i]] for i in range(2)])

    reward = load_reward(RewardConfig(name="vlm_compare", path=folder,
                                      options={"criterion": criterion, "output": "logprob"}))
    assert isinstance(reward, VLMCompare)
    metadata = [{"reference_image": reference} for reference in references]
    with torch.no_grad():
        scores, _ = reward(images, PROMPTS[:2], metadata)
        swapped, _ = reward(images, PROMPTS[:2], metadata[::-1])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    assert (swapped - scores).abs().max() > 1e-3  # the reference image matters

    with pytest.raises(ValueError, match="reference_image"):
        reward(images, PROMPTS[:2])
    with pytest.raises(ValueError, match="reference_image"):
        reward(images, PROMPTS[:2], [{"reference_image": 2 * reference} for reference in references])
    with pytest.raises(ConfigError, match="qwen2_vl"):
        load_reward(RewardConfig(name="vlm_compare", path=checkpoints("llava")))


def test_loading_errors(checkpoints):
    with pytest.raises(WeightsNotFoundError, match="genalign-test/no-such-vlm"):
        load_reward(RewardConfig(name="vlm", path="genalign-test/no-such-vlm"))
    with pytest.raises(ConfigError, match="reward.path"):
        load_reward(RewardConfig(name="vlm"))
    folder = checkpoints("qwen2_vl")
    with pytest.raises(ConfigError, match="unknown option"):
        load_reward(RewardConfig(name="vlm", path=folder, options={"temperature": 2}))
    with pytest.raises(ConfigError, match="prompt"):
        load_reward(RewardConfig(name="vlm", path=folder, options={"template": "Is this {subject}?"}))
    with pytest.raises(ConfigError, match="output"):
        load_reward(RewardConfig(name="vlm", path=folder, options={"output": "logit"}))
    with pytest.raises(ConfigError, match="Qwen2-VL family"):
        load_reward(RewardConfig(name="vlm", path=checkpoints("llava"), options={"max_pixels": 1000}))


def test_compare_with_the_source_image_of_an_edit(checkpoints):
    """``reference: source_image`` reads the row's source image; WithSourceImages adds it per prompt."""
    from genalign.rewards.combine import WithSourceImages

    folder = checkpoints("qwen2_vl")
    images = random_images(2, NATIVE_QWEN, seed=8)
    sources = random_images(2, NATIVE_QWEN, seed=9)
    template = 'Here are two images. Is the first image the second one edited as follows: "{prompt}"?'
    by_reference = load_reward(RewardConfig(name="vlm_compare", path=folder, options={"template": template}))
    by_source = load_reward(RewardConfig(name="vlm_compare", path=folder,
                                         options={"template": template, "reference": "source_image"}))
    wrapped = WithSourceImages(by_source, dict(zip(PROMPTS[:2], sources)))
    assert wrapped.differentiable and wrapped.label == "vlm_compare"
    with torch.no_grad():
        expected, _ = by_reference(images, PROMPTS[:2], [{"reference_image": s} for s in sources])
        direct, _ = by_source(images, PROMPTS[:2], [{"source_image": s} for s in sources])
        through, subs = wrapped(images, PROMPTS[:2])
    torch.testing.assert_close(direct, expected)
    torch.testing.assert_close(through, expected)
    assert set(subs) == {"vlm_compare"}
    with pytest.raises(ValueError, match="source_image"):
        by_source(images, PROMPTS[:2], [{"reference_image": s} for s in sources])
    with pytest.raises(ConfigError, match="reference"):
        load_reward(RewardConfig(name="vlm_compare", path=folder, options={"reference": "target"}))
