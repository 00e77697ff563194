"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): Qwen2-VL-7B-Instruct
with a reward head read at a ``<|Reward|>`` token the prompt ends with; score = mu of the head's
(mu, log sigma), trained with a Bradley-Terry loss under uncertainty. Higher is better; the paper's
model averages run from about 0 (SD2) to 11 (Kolors).

As the official code (MizzenAI/HPSv3, ``hpsv3/inference.py``, ``hpsv3/model/qwen2vl_trainer.py``):

- the question is ``INSTRUCTION.format(text_prompt=prompt) + REWARD_SUFFIX`` (byte for byte, typos
  and trailing spaces kept), one user turn after the image, the checkpoint processor's chat template
  with the generation prompt; ``<|Reward|>`` is one added special token (embeddings resized to the
  tokenizer's length), rows padded on the right;
- the image is resized (bicubic) to ``smart_resize`` with min = max = 256 * 28 * 28 pixels (a square
  image: 448 x 448, 256 image tokens), then Qwen2-VL's normalisation and patches;
- the language model runs with plain sequential positions 0..L-1 in all three M-RoPE sections: the
  official forward calls the text model with ``position_ids=None`` under transformers 4.45, which
  never builds Qwen2-VL's 2-D image positions (transformers 5 would);
- the head ``Linear(D, 1024) ReLU Dropout(.05) Linear(1024, 16) ReLU Linear(16, 2)`` runs in fp32 on
  the last hidden state at ``<|Reward|>``.

The image processing runs on tensors (``rewards/vlm.py``'s ``QwenPixels``), so gradients reach the
pixels. Config: ``{name: hpsv3}``; ``path``: the hub repo or a folder / file with
``HPSv3.safetensors`` (default ``MizzenAI/HPSv3``); ``options.base``: the Qwen2-VL checkpoint whose
config and processor it was trained from (default ``Qwen/Qwen2-VL-7B-Instruct``);
``options.min_pixels`` / ``max_pixels`` (default 200704 both; fewer is cheaper and off-distribution).
``head_outputs`` also gives the head's log sigma, the model's uncertainty.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.core.loading import from_pretrained_or_explain, resolve_file
from genalign.rewards import register
from genalign.rewards.base import DTYPES, Metadata, RewardModel, cached, check_options, checkpoint_layers, freeze
from genalign.rewards.vlm import QwenPixels, expand_image_tokens

# hpsv3/dataset/data_collator_qwen.py: INSTRUCTION and prompt_with_special_token, as published
INSTRUCTION = "\n".join([
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being "
    "the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal "
    "body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult "
    "material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. "
    "The generated content should not introduce elements that conflict with or distort the original description.",
    "Textual prompt - {text_prompt}",
    "",
    "",
    "",
])
REWARD_TOKEN = "<|Reward|>"
REWARD_SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
CHECKPOINT = "HPSv3.safetensors"
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
PIXELS = 256 * 28 * 28  # hpsv3/inference.py: min_pixels = max_pixels


def reward_head(width: int) -> nn.Sequential:
    """The ``ranknet`` head of ``Qwen2VLRewardModelBT`` without ``rm_head_kwargs`` (indices 0, 3, 5 hold
    the weights, as in the checkpoint): width -> 1024 -> 16 -> (mu, log sigma)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def split_checkpoint(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(Qwen2VLModel state dict in transformers 5's names, head state dict) from the published file:
    transformers 4.45 names (``model.layers.*``, ``visual.*``, ``lm_head.*``, ``rm_head.*``) or 5's
    (``model.language_model.*``, ``model.visual.*``); the LM head is not used and dropped."""
    if isinstance(state.get("model"), Mapping):  # the official loader unwraps it too
        state = state["model"]  # type: ignore[assignment]
    vlm, head = {}, {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key.removeprefix("rm_head.")] = value
        elif key.startswith("lm_head."):
            continue
        elif key.startswith(("model.language_model.", "model.visual.")):
            vlm[key.removeprefix("model.")] = value
        elif key.startswith("model."):
            vlm["language_model." + key.removeprefix("model.")] = value
        elif key.startswith("visual."):
            vlm[key] = value
        else:
            raise ValueError(f"unexpected key {key!r} in the HPSv3 checkpoint")
    if not head:
        raise ValueError("the checkpoint has no rm_head.* weights: not an HPSv3 checkpoint")
    return vlm, head


class HPSv3Model(nn.Module):
    """Qwen2-VL (vision tower + language model, no LM head) and the reward head."""

    def __init__(self, vlm: nn.Module, head: nn.Module):
        super().__init__()
        self.vlm, self.head = vlm, head

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                image_token_id: int, reward_token_id: int) -> Tensor:
        """(B, 2) head outputs (mu, log sigma) at each row's ``<|Reward|>`` token."""
        embeds = self.vlm.get_input_embeddings()(input_ids)
        features = self.vlm.get_image_features(pixel_values.to(embeds.dtype), image_grid_thw).pooler_output
        is_image = (input_ids == image_token_id)[..., None]
        embeds = embeds.masked_scatter(is_image, torch.cat(list(features)).to(embeds.dtype))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.vlm.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                         use_cache=False).last_hidden_state  # (B, L, D)
        is_reward = input_ids == reward_token_id
        if not bool((is_reward.sum(-1) == 1).all()):
            raise ValueError(f"every row needs exactly one {REWARD_TOKEN} token")
        return self.head(hidden[is_reward].float())


def load_hpsv3(file: Path, base: str, device: torch.device, dtype: torch.dtype, checkpointing: bool) -> tuple[
        HPSv3Model, Any]:
    """The model and its processor (``<|Reward|>`` added) from the checkpoint file and the base's
    config and processor; the 7B weights are materialised once, from the file."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor, Qwen2VLModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    hint = f"options.base names the Qwen2-VL checkpoint HPSv3 was trained from (default {DEFAULT_BASE})"
    config = from_pretrained_or_explain(AutoConfig, base, hint=hint, trust_remote_code=False)
    if config.model_type != "qwen2_vl":
        raise ConfigError(f"hpsv3: options.base '{base}' is a {config.model_type!r} model; HPSv3 is a Qwen2-VL")
    processor = from_pretrained_or_explain(AutoProcessor, base, hint=hint, trust_remote_code=False)
    tokenizer = processor.tokenizer
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([REWARD_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vlm_state, head_state = split_checkpoint(load_file(str(file)))
    rows = vlm_state["language_model.embed_tokens.weight"].shape[0]
    if rows != len(tokenizer):
        raise ValueError(f"{file}: {rows} token embeddings, but the tokenizer of '{base}' with {REWARD_TOKEN} has "
                         f"{len(tokenizer)}: options.base must be the checkpoint HPSv3 was trained from")
    config.text_config.vocab_size = rows
    with init_empty_weights(include_buffers=False):
        vlm = Qwen2VLModel(config)
    vlm.load_state_dict(vlm_state, strict=True, assign=True)
    head = reward_head(config.text_config.hidden_size)
    head.load_state_dict(head_state, strict=True)
    model = freeze(HPSv3Model(vlm.to(device, dtype), head.to(device, torch.float32)))
    if checkpointing:
        checkpoint_layers(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    return model, processor


@register("hpsv3")
class HPSv3(RewardModel):
    """HPSv3's mu for (image, prompt); differentiable (tensor preprocessing)."""

    summary = "HPSv3 human preference score (Qwen2-VL-7B with a reward head)"
    name = "hpsv3"
    differentiable = True
    default_path = "MizzenAI/HPSv3"

    def __init__(self, model: HPSv3Model, processor: Any, pixels: QwenPixels, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(device, dtype)
        self.model, self.processor, self.pixels = model, processor, pixels
        self.tokenizer = processor.tokenizer
        self.reward_token_id = int(self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        self.image_token_id = int(model.vlm.config.image_token_id)

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> HPSv3:
        check_options(config.name, config.options, ("base", "min_pixels", "max_pixels"))
        file = resolve_file(config.path or cls.default_path, CHECKPOINT,
                            hint=f"Download {CHECKPOINT} from {cls.default_path} or set reward.path to it")
        base = str(config.options.get("base", DEFAULT_BASE))
        device, dtype = torch.device(device), DTYPES[config.dtype]
        model, processor = cached(("hpsv3", str(file), base, str(device), dtype, config.gradient_checkpointing),
                                  lambda: load_hpsv3(file, base, device, dtype, config.gradient_checkpointing))
        pixels = QwenPixels.from_processor(processor, int(config.options.get("min_pixels", PIXELS)),
                                           int(config.options.get("max_pixels", PIXELS)))
        return cls(model, processor, pixels, device, dtype)

    def texts(self, prompts: list[str], tokens_per_image: list[int]) -> list[str]:
        """The chat-formatted questions with each image's placeholder expanded."""
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {
                    "type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + REWARD_SUFFIX}]}],
                add_generation_prompt=True, tokenize=False)
            for prompt in prompts
        ]
        return expand_image_tokens(texts, self.processor.image_token, tokens_per_image)

    def head_outputs(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B, 2): mu and log sigma."""
        vision, tokens_per_image = self.pixels(list(images))
        tokens = self.tokenizer(self.texts(prompts, tokens_per_image), padding=True, padding_side="right",
                                return_tensors="pt").to(self.device)
        return self.model(tokens["input_ids"], tokens["attention_mask"], vision["pixel_values"].to(self.dtype),
                          vision["image_grid_thw"], self.image_token_id, self.reward_token_id)

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        return self.head_outputs(images, prompts)[:, 0]
