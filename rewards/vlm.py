"""Rewards read from a vision-language model's answer: VQAScore, P("Yes") to "does this image show
the prompt?" (Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text
Generation"), and its comparative form "is the first image better than the second?", the way
generative reward models use a VLM.

Config: ``{name: vlm, path: Qwen/Qwen2-VL-7B-Instruct}`` (a hub id or folder of a Qwen2-VL,
Qwen2.5-VL or LLaVA checkpoint; required). Options of both forms:

- ``template``: the question, with a ``{prompt}`` field (and ``{criterion}`` for ``vlm_compare``).
  Default: the family's published VQAScore question (t2v_metrics): ``Does this image show
  "{prompt}"?`` for Qwen2-VL / Qwen2.5-VL, ``Does this figure show "{prompt}"? Please answer yes or
  no.`` for LLaVA.
- ``scoring``: ``first_token`` (default: P of the answer's token right after the question, one
  forward pass) or ``sequence``: the answer followed by the end-of-sequence token scored whole,
  exp(mean log p) over its tokens, LLaVA-1.5's published VQAScore (``"Yes</s>"``; the answer may
  then be several tokens, one string).
- ``answer``: the answer whose probability is the score, a string or a list of strings whose
  probabilities are summed; each must be one token (default ``Yes``, as in VQAScore).
- ``output``: ``prob`` (P(answer), default) or ``logprob`` (log P(answer)).
- ``min_pixels`` / ``max_pixels``: Qwen2-VL family only, override the processor's resize bounds
  (fewer pixels, fewer image tokens, cheaper reward).

``{name: vlm_compare, path: ..., options: {criterion: ...}}`` asks the model about the image and a
reference image given per sample as ``metadata[i]["reference_image"]``, a (3, H, W) tensor in
[0, 1]; the question's ``{criterion}`` is ``options.criterion``. It needs a multi-image model
(the Qwen2-VL family). ``options.reference: source_image`` compares with ``metadata[i]["source_image"]``
instead: an editing model's source image, which runs of editing backbones add to every row (with a
template asking whether the first image is the second edited as instructed).

The score is read from ONE forward pass over the chat-formatted question with the generation prompt
appended: the softmax at the last prompt position, i.e. the first answer token (not ``generate``),
or with ``scoring: sequence`` over the question followed by the answer.
The text side goes through the checkpoint's processor (chat template, image placeholders expanded
to the image's token count); the images never do: the image processor (PIL / torchvision, no
gradients) is reproduced on tensors below, so gradients reach the pixels. The parity with the
official image processors on a real photo is asserted in ``tests/test_reward_vlm.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.core.loading import from_pretrained_or_explain
from genalign.rewards import register
from genalign.rewards.base import (
    DTYPES,
    Metadata,
    RewardInputError,
    RewardModel,
    cached,
    checkpoint_layers,
    freeze,
)
from genalign.rewards.preprocess import center_crop, normalize, resize, shortest_side_size

# VQAScore's question and answer (t2v_metrics, default_question_template / default_answer_template):
# CLIP-FlanT5 and LLaVA-1.5 ask this; its Qwen2-VL wrapper (qwen2vl_model.py) asks FAMILY_TEMPLATES'
VQASCORE_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'
COMPARE_TEMPLATE = (
    "Here are two images. Compared with the second image, is the first image better in terms of "
    '{criterion} for the prompt "{prompt}"? Please answer yes or no.'
)
DEFAULT_CRITERION = "overall quality"

# config.model_type -> transformers class; one family per image-processing convention
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # Qwen2VLImageProcessor, several images per prompt
# each family's published VQAScore question (t2v_metrics: qwen2vl_model.py, llava_model.py)
FAMILY_TEMPLATES = {"qwen2_vl": 'Does this image show "{prompt}"?', "qwen2_5_vl": 'Does this image show "{prompt}"?',
                    "llava": 'Does this figure show "{prompt}"? Please answer yes or no.'}
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resampling codes the processors store


def _resample_mode(resample: Any) -> str:
    code = 2 if resample is None else int(resample)  # transformers' torchvision backend: None -> bilinear
    if code not in _RESAMPLE_MODES:
        raise NotImplementedError(f"image processor resample={resample!r}: only bilinear and bicubic are reproduced")
    return _RESAMPLE_MODES[code]


def _check_rescale(image_processor: Any) -> None:
    """Our images are already floats in [0, 1], which is what uint8 * 1/255 gives the processor."""
    if not getattr(image_processor, "do_rescale", True) or abs(image_processor.rescale_factor * 255 - 1) > 1e-6:
        raise NotImplementedError(
            f"{type(image_processor).__name__} with do_rescale={image_processor.do_rescale}, "
            f"rescale_factor={image_processor.rescale_factor}: only uint8 / 255 inputs are reproduced"
        )


def _resize_like_uint8(images: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize as the processors do on uint8 images: two passes, horizontal then vertical
    (torchvision's uint8 kernels, like PIL's), each clipped to [0, 1] since bicubic overshoots at
    sharp edges. What remains is their rounding to integers, at most ~1/255 (see the parity test)."""
    height, width = images.shape[-2:]
    if width != size[1]:
        images = resize(images, (height, size[1]), mode).clamp(0, 1)
    if height != size[0]:
        images = resize(images, tuple(size), mode).clamp(0, 1)
    return images


def _by_shape(images: Sequence[Tensor], process: Callable[[Tensor], list[Any]]) -> list[Any]:
    """Apply ``process`` to the images (3, H, W) batched per size; results in input order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    results: list[Any] = [None] * len(images)
    for indices in groups.values():
        for index, result in zip(indices, process(torch.stack([images[i] for i in indices]))):
            results[index] = result
    return results


def expand_image_tokens(texts: Sequence[str], image_token: str, tokens_per_image: Sequence[int]) -> list[str]:
    """Each image's placeholder in the chat texts repeated to its token count, images in reading order
    (what the processors do before tokenising)."""
    counts = iter(tokens_per_image)
    expanded = []
    for text in texts:
        parts = text.split(image_token)
        expanded.append(parts[0] + "".join(image_token * next(counts) + part for part in parts[1:]))
    if next(counts, None) is not None:
        raise ValueError("the chat template dropped image placeholders")
    return expanded


@dataclass(frozen=True)
class QwenPixels:
    """``Qwen2VLImageProcessor`` (also Qwen2.5-VL's) on tensors.

    Each image is resized (bicubic) to ``smart_resize``'s size, multiples of patch_size * merge_size
    with a pixel count within [min_pixels, max_pixels], normalised, repeated to temporal_patch_size
    frames and cut into patches: ``pixel_values`` (sum of grid_h * grid_w, C * T * p * p) in the
    processor's order (merge windows of merge_size^2 patches contiguous, each patch flattened as
    channel, frame, row, column) and ``image_grid_thw`` rows (1, grid_h, grid_w).
    """

    min_pixels: int
    max_pixels: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "bicubic"

    @classmethod
    def from_processor(cls, processor: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> QwenPixels:
        image_processor = processor.image_processor
        _check_rescale(image_processor)
        size = image_processor.size
        return cls(
            min_pixels=int(min_pixels if min_pixels is not None else size["shortest_edge"]),
            max_pixels=int(max_pixels if max_pixels is not None else size["longest_edge"]),
            patch_size=int(image_processor.patch_size),
            merge_size=int(image_processor.merge_size),
            temporal_patch_size=int(image_processor.temporal_patch_size),
            mean=tuple(image_processor.image_mean),
            std=tuple(image_processor.image_std),
            mode=_resample_mode(image_processor.resample),
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def patchify(self, images: Tensor) -> list[tuple[Tensor, list[int]]]:
        """images (N, 3, H, W) in [0, 1] -> per image (patches (gh * gw, C * T * p * p), [1, gh, gw])."""
        n, channels, height, width = images.shape
        new_h, new_w = self.resized_size(height, width)
        pixels = normalize(_resize_like_uint8(images.float(), (new_h, new_w), self.mode), self.mean, self.std)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = new_h // p, new_w // p
        patches = pixels.reshape(n, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (N, gh/m, gw/m, m, m, C, p, p)
        patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)  # a still image is T equal frames
        patches = patches.reshape(n, grid_h * grid_w, channels * t * p * p)
        return [(patches[i], [1, grid_h, grid_w]) for i in range(n)]

    def __call__(self, images: Sequence[Tensor]) -> tuple[dict[str, Tensor], list[int]]:
        """images, each (3, H, W) in [0, 1] -> the model's image inputs and each image's token count."""
        per_image = _by_shape(images, self.patchify)
        grids = torch.tensor([grid for _, grid in per_image], dtype=torch.long, device=images[0].device)
        inputs = {"pixel_values": torch.cat([patches for patches, _ in per_image]), "image_grid_thw": grids}
        return inputs, (grids.prod(-1) // self.merge_size**2).tolist()


@dataclass(frozen=True)
class LlavaPixels:
    """``LlavaImageProcessor`` / ``CLIPImageProcessor`` on tensors: optional padding to a square with
    the mean colour (LLaVA-1.5's ``pad`` aspect ratio), resize of the shortest side (or to exactly
    (H, W)), centre crop (offsets floored, as the processors do), normalise."""

    pad_to_square: bool
    resize_to: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokens_per_image: int
    mode: str = "bicubic"

    @classmethod
    def from_processor(cls, processor: Any) -> LlavaPixels:
        image_processor = processor.image_processor
        _check_rescale(image_processor)
        size, crop = image_processor.size, getattr(image_processor, "crop_size", None)
        if not image_processor.do_resize:
            resize_to = None
        elif size.get("shortest_edge"):
            resize_to = int(size["shortest_edge"])
        else:
            resize_to = (int(size["height"]), int(size["width"]))
        crop_hw = (int(crop["height"]), int(crop["width"])) if crop and image_processor.do_center_crop else None
        if crop_hw is None and not isinstance(resize_to, tuple):
            raise NotImplementedError("LLaVA image processors without a fixed output size are not reproduced")
        out_h, out_w = crop_hw or resize_to  # type: ignore[misc]
        # LlavaProcessor.replace_image_token: patches (+ CLS), less CLS under the "default" feature strategy
        tokens = (out_h // processor.patch_size) * (out_w // processor.patch_size)
        tokens += processor.num_additional_image_tokens
        tokens -= processor.vision_feature_select_strategy == "default"
        return cls(
            pad_to_square=bool(getattr(image_processor, "do_pad", False)),
            resize_to=resize_to,
            crop=crop_hw,
            mean=tuple(image_processor.image_mean),
            std=tuple(image_processor.image_std),
            tokens_per_image=int(tokens),
            mode=_resample_mode(image_processor.resample),
        )

    def transform(self, images: Tensor) -> list[Tensor]:
        """images (N, 3, H, W) in [0, 1] -> per image (3, h, w), normalised."""
        images = images.float()
        if self.pad_to_square:
            images = self._pad_to_square(images)
        if isinstance(self.resize_to, int):
            size = shortest_side_size(images.shape[-2], images.shape[-1], self.resize_to)
            images = _resize_like_uint8(images, size, self.mode)
        elif self.resize_to is not None:
            images = _resize_like_uint8(images, self.resize_to, self.mode)
        if self.crop is not None:
            images = center_crop(images, self.crop, floor=True)
        return list(normalize(images, self.mean, self.std))

    def _pad_to_square(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        side = max(height, width)
        # the processor fills uint8 images with int(mean * 255)
        fill = torch.tensor([int(m * 255) / 255 for m in self.mean], dtype=images.dtype, device=images.device)
        canvas = fill.view(1, -1, 1, 1).expand(images.shape[0], -1, side, side).clone()
        top, left = (side - height) // 2, (side - width) // 2
        canvas[..., top : top + height, left : left + width] = images
        return canvas


    def __call__(self, images: Sequence[Tensor]) -> tuple[dict[str, Tensor], list[int]]:
        pixel_values = torch.stack(_by_shape(images, self.transform))  # (N, 3, h, w)
        return {"pixel_values": pixel_values}, [self.tokens_per_image] * len(images)


Pixels = QwenPixels | LlavaPixels


class VisionLanguageModel:
    """A transformers VLM (frozen, eval mode) and its processor; ``answer_logprobs`` reads the
    log-probabilities of the first answer token after chat-formatted questions about images."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, checkpointing: bool = False):
        import transformers
        from transformers import AutoConfig, AutoProcessor
        from transformers.modeling_layers import GradientCheckpointingLayer

        hint = "Set reward.path to a local folder or hub id of a Qwen2-VL, Qwen2.5-VL or LLaVA checkpoint"
        model_config = from_pretrained_or_explain(AutoConfig, path, hint=hint, trust_remote_code=False)
        self.family = model_config.model_type
        if self.family not in MODEL_CLASSES:
            raise ConfigError(
                f"reward.path '{path}' is a {self.family!r} model; the vlm rewards support {sorted(MODEL_CLASSES)}"
            )
        model_class = getattr(transformers, MODEL_CLASSES[self.family])
        self.model = freeze(from_pretrained_or_explain(model_class, path, hint=hint, dtype=dtype)).to(device)
        self.processor = from_pretrained_or_explain(AutoProcessor, path, hint=hint, trust_remote_code=False)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token is None:  # padded positions are masked out; any token will do
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.image_token = self.processor.image_token
        self.image_token_id = int(self.model.config.image_token_id)
        self.device, self.dtype = device, dtype
        if checkpointing:  # the decoder layers and the vision blocks
            checkpoint_layers(m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer))

    def pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> Pixels:
        """The tensor preprocessing of this checkpoint's images."""
        if self.family in QWEN_FAMILIES:
            return QwenPixels.from_processor(self.processor, min_pixels, max_pixels)
        if min_pixels is not None or max_pixels is not None:
            raise ConfigError(f"min_pixels / max_pixels apply to the Qwen2-VL family, not to {self.family!r}")
        return LlavaPixels.from_processor(self.processor)

    def token_ids(self, answers: Sequence[str]) -> list[int]:
        """Each answer's single token id (as the tokenizer encodes it alone, e.g. LLaMA's '▁Yes')."""
        ids = []
        for answer in answers:
            encoded = self.tokenizer.encode(answer, add_special_tokens=False)
            if len(encoded) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(encoded)
                raise ConfigError(f"answer {answer!r} is {len(encoded)} tokens {pieces} for this tokenizer; "
                                  "options.answer must be single tokens")
            ids.append(encoded[0])
        return ids

    def chat_texts(self, questions: Sequence[str], images_per_question: int) -> list[str]:
        """The chat template applied to one user turn (images first, then the question), with the
        assistant's generation prompt appended: the answer's first token comes next."""
        content = [{"type": "image"}] * images_per_question
        return [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [*content, {"type": "text", "text": question}]}],
                add_generation_prompt=True, tokenize=False,
            )
            for question in questions
        ]

    def _expand_image_tokens(self, texts: list[str], tokens_per_image: list[int]) -> list[str]:
        return expand_image_tokens(texts, self.image_token, tokens_per_image)

    def prompt_texts(self, questions: Sequence[str], images: Sequence[Sequence[Tensor]], pixels: Pixels,
                     prefixes: Sequence[str] | None = None) -> tuple[list[str], dict[str, Tensor], list[int]]:
        """The chat texts (image placeholders expanded, each followed by its answer prefix, if any),
        the vision inputs and each image's token count."""
        per_question = {len(group) for group in images}
        if len(per_question) != 1:
            raise ValueError("every question needs the same number of images")
        vision_inputs, tokens_per_image = pixels([image for group in images for image in group])
        vision_inputs["pixel_values"] = vision_inputs["pixel_values"].to(self.dtype)
        texts = self._expand_image_tokens(self.chat_texts(questions, per_question.pop()), tokens_per_image)
        if prefixes is not None:
            texts = [text + prefix for text, prefix in zip(texts, prefixes, strict=True)]
        return texts, vision_inputs, tokens_per_image

    @torch.no_grad()
    def generate(self, questions: Sequence[str], images: Sequence[Sequence[Tensor]], pixels: Pixels,
                 max_new_tokens: int) -> list[str]:
        """Each question's greedy answer (special tokens dropped)."""
        texts, vision_inputs, _ = self.prompt_texts(questions, images, pixels)
        tokens = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                                add_special_tokens=self._add_special(texts)).to(self.device)
        # Qwen's 3-D positions need to know which tokens are image tokens (as the processor returns)
        extra = ({"mm_token_type_ids": (tokens["input_ids"] == self.image_token_id).long()}
                 if "image_grid_thw" in vision_inputs else {})
        out = self.model.generate(**tokens, **vision_inputs, **extra, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, tokens["input_ids"].shape[1]:], skip_special_tokens=True)

    def answer_logprobs(self, questions: Sequence[str], images: Sequence[Sequence[Tensor]], pixels: Pixels,
                        answer_ids: Sequence[int], sequence: str | None = None,
                        prefixes: Sequence[str] | None = None) -> Tensor:
        """log P(answer) (B,), fp32: questions[b] asked about images[b] (each (3, H, W) in [0, 1]);
        the answer's probability is the sum over ``answer_ids`` at the first answer position (after
        ``prefixes[b]``, the start of the answer, if given), or with ``sequence`` (an answer string)
        the mean log-probability of its tokens and the end-of-sequence token after the generation
        prompt and a space (t2v_metrics' LLaVA form, ``"Yes</s>"``)."""
        if sequence is not None:
            texts, vision_inputs, tokens_per_image = self.prompt_texts(questions, images, pixels, prefixes)
            return self._sequence_logprobs(texts, sequence, self._add_special(texts), vision_inputs, tokens_per_image)
        return self.next_token_logprobs(questions, images, pixels, prefixes)[:, list(answer_ids)].logsumexp(-1)

    def _add_special(self, texts: Sequence[str]) -> bool:
        """As the processor's apply_chat_template: no second BOS when the template writes one."""
        bos = self.tokenizer.bos_token
        return not (bos is not None and texts[0].startswith(bos))

    def next_token_logprobs(self, questions: Sequence[str], images: Sequence[Sequence[Tensor]], pixels: Pixels,
                            prefixes: Sequence[str] | None = None) -> Tensor:
        """(B, V) fp32 log-probabilities of the token after each chat prompt (and its prefix)."""
        texts, vision_inputs, tokens_per_image = self.prompt_texts(questions, images, pixels, prefixes)
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt",
                                add_special_tokens=self._add_special(texts)).to(self.device)
        input_ids, mask = tokens["input_ids"], tokens["attention_mask"]  # (B, L)
        is_image = input_ids == self.image_token_id
        if int(is_image.sum()) != sum(tokens_per_image):
            raise ValueError(f"{int(is_image.sum())} image tokens in the text, {sum(tokens_per_image)} image features")
        extra = {"mm_token_type_ids": is_image.long()} if "image_grid_thw" in vision_inputs else {}
        hidden = self.model.model(input_ids=input_ids, attention_mask=mask, use_cache=False, **vision_inputs,
                                  **extra).last_hidden_state  # (B, L, D)
        # the last real token, whichever side the tokenizer pads
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * positions).argmax(-1)  # (B,)
        logits = self.model.get_output_embeddings()(hidden[torch.arange(len(last), device=last.device), last])
        return logits.float().log_softmax(-1)

    def _sequence_logprobs(self, texts: list[str], answer: str, add_special: bool, vision_inputs: dict[str, Tensor],
                           tokens_per_image: list[int]) -> Tensor:
        eos = self.tokenizer.eos_token
        if eos is None:
            raise ConfigError("scoring: sequence needs a tokenizer with an end-of-sequence token")
        full = [f"{text} {answer}{eos}" for text in texts]
        prefix_lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=add_special)["input_ids"]]
        tokens = self.tokenizer(full, padding=True, return_tensors="pt", add_special_tokens=add_special).to(self.device)
        input_ids, mask = tokens["input_ids"], tokens["attention_mask"]
        is_image = input_ids == self.image_token_id
        if int(is_image.sum()) != sum(tokens_per_image):
            raise ValueError(f"{int(is_image.sum())} image tokens in the text, {sum(tokens_per_image)} image features")
        extra = {"mm_token_type_ids": is_image.long()} if "image_grid_thw" in vision_inputs else {}
        hidden = self.model.model(input_ids=input_ids, attention_mask=mask, use_cache=False, **vision_inputs,
                                  **extra).last_hidden_state  # (B, L, D)
        head = self.model.get_output_embeddings()
        scores = []
        for b, prefix in enumerate(prefix_lengths):
            real = mask[b].nonzero().flatten()  # the row's token positions, whichever side it is padded
            answer_positions = real[prefix:]
            if len(answer_positions) == 0:
                raise ValueError(f"the answer {answer!r} added no token after the question")
            logprobs = head(hidden[b, answer_positions - 1]).float().log_softmax(-1)  # predicted from the previous
            scores.append(logprobs.gather(1, input_ids[b, answer_positions][:, None]).mean())
        return torch.stack(scores)


def load_vlm(config: RewardConfig, device: torch.device) -> VisionLanguageModel:
    """The VLM a config names, loaded once per (weights, device, dtype, checkpointing)."""
    if not config.path:
        raise ConfigError(f"reward {config.name} needs reward.path: a hub id or folder of a Qwen2-VL, Qwen2.5-VL "
                          "or LLaVA checkpoint, e.g. Qwen/Qwen2-VL-7B-Instruct")
    dtype, ckpt = DTYPES[config.dtype], config.gradient_checkpointing
    key = ("vlm", config.path, str(device), dtype, ckpt)
    return cached(key, lambda: VisionLanguageModel(config.path, device, dtype, ckpt))


def _check_template(template: str, fields: Sequence[str], name: str) -> str:
    """A question template that formats with exactly the given fields and uses {prompt}."""
    try:
        template.format(**{field: "" for field in fields})
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"reward {name}: options.template {template!r} may only use the fields "
                          f"{', '.join('{' + f + '}' for f in fields)} ({err!r})") from err
    if "{prompt}" not in template:
        raise ConfigError(f"reward {name}: options.template {template!r} needs a {{prompt}} field")
    return template


@register("vlm")
class VQAScore(RewardModel):
    """P(answer | image, question) from a VLM, one forward pass (VQAScore, Lin et al. 2024:
    P("Yes" | image, 'Does this figure show "{text}"? Please answer yes or no.')).

    Higher is better; in [0, 1] (``output: prob``) or (-inf, 0] (``output: logprob``).
    Differentiable: gradients reach the pixels through the tensor preprocessing.
    """
    summary = "P('Yes') of a VLM asked whether the image shows the prompt (VQAScore)"

    name = "vlm"
    differentiable = True
    default_template: str | None = None  # None: the family's published question (FAMILY_TEMPLATES)
    known_options: tuple[str, ...] = ("template", "answer", "output", "scoring", "min_pixels", "max_pixels")
    template_fields: tuple[str, ...] = ("prompt",)
    families: tuple[str, ...] = tuple(MODEL_CLASSES)

    def __init__(self, vlm: VisionLanguageModel, pixels: Pixels, template: str, answer_ids: Sequence[int],
                 output: str = "prob", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 sequence: str | None = None):
        super().__init__(device, dtype)
        self.vlm, self.pixels, self.template = vlm, pixels, template
        self.answer_ids, self.output, self.sequence = list(answer_ids), output, sequence

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> VQAScore:
        options = dict(config.options)
        unknown = set(options) - set(cls.known_options)
        if unknown:
            raise ConfigError(f"reward {config.name}: unknown option(s) {sorted(unknown)}; "
                              f"known: {', '.join(cls.known_options)}")
        output = options.get("output", "prob")
        if output not in ("prob", "logprob"):
            raise ConfigError(f"reward {config.name}: options.output must be prob or logprob, got {output!r}")
        scoring = options.get("scoring", "first_token")
        if scoring not in ("first_token", "sequence"):
            raise ConfigError(f"reward {config.name}: options.scoring must be first_token or sequence, got {scoring!r}")
        answers = options.get("answer", "Yes")
        if scoring == "sequence" and not isinstance(answers, str):
            raise ConfigError(f"reward {config.name}: scoring: sequence scores one answer string, got {answers!r}")
        answers = [answers] if isinstance(answers, str) else list(answers)
        device = torch.device(device)
        vlm = load_vlm(config, device)
        if vlm.family not in cls.families:
            raise ConfigError(f"reward {config.name} needs a {' / '.join(cls.families)} checkpoint; "
                              f"'{config.path}' is {vlm.family!r}")
        if scoring == "sequence" and vlm.family != "llava":
            raise ConfigError(f"reward {config.name}: scoring: sequence is LLaVA-1.5's published form (\"ASSISTANT: "
                              f"Yes</s>\"); {vlm.family!r} is scored on the first answer token")
        default = cls.default_template or FAMILY_TEMPLATES[vlm.family]
        template = _check_template(str(options.get("template", default)), cls.template_fields, config.name)
        if "criterion" in cls.template_fields:  # fixed per reward: fill it in now, keep {prompt}
            criterion = str(options.get("criterion", DEFAULT_CRITERION)).replace("{", "{{").replace("}", "}}")
            template = template.format(prompt="{prompt}", criterion=criterion)
        pixels = vlm.pixels(options.get("min_pixels"), options.get("max_pixels"))
        answer_ids = vlm.token_ids(answers) if scoring == "first_token" else []
        return cls(vlm, pixels, template, answer_ids, output, device, DTYPES[config.dtype],
                   answers[0] if scoring == "sequence" else None)

    def questions(self, prompts: list[str]) -> list[str]:
        return [self.template.format(prompt=prompt) for prompt in prompts]

    def images(self, images: Tensor, metadata: Metadata) -> list[list[Tensor]]:
        return [[image] for image in images]

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        logprobs = self.vlm.answer_logprobs(self.questions(prompts), self.images(images, metadata), self.pixels,
                                            self.answer_ids, self.sequence)
        return logprobs if self.output == "logprob" else logprobs.exp()


@register("vlm_compare")
class VLMCompare(VQAScore):
    """P("Yes" | image, reference image, "is the first image better than the second in terms of
    {criterion} for {prompt}?"): a pairwise judgement against ``metadata[i]["reference_image"]``,
    read from one forward pass like :class:`VQAScore`. Differentiable in the first image."""
    summary = "P('Yes') of a VLM asked whether the image beats a reference image"

    name = "vlm_compare"
    default_template: str | None = COMPARE_TEMPLATE
    known_options = (*VQAScore.known_options, "criterion", "reference")
    template_fields = ("prompt", "criterion")
    families = QWEN_FAMILIES  # two images per question: LLaVA-1.5 was trained on one
    reference_key = "reference_image"  # options.reference: source_image compares an edit with its source

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> VQAScore:
        options = dict(config.options)
        key = str(options.pop("reference", "reference_image"))
        if key not in ("reference_image", "source_image"):
            raise ConfigError(f"reward {config.name}: options.reference is reference_image or source_image, got {key!r}")
        reward = super().from_config(replace(config, options=options), device)
        reward.reference_key = key
        return reward

    def images(self, images: Tensor, metadata: Metadata) -> list[list[Tensor]]:
        return reference_pairs(self.name, images, metadata, self.reference_key, self.device)


def reference_pairs(name: str, images: Tensor, metadata: Metadata, key: str,
                    device: torch.device) -> list[list[Tensor]]:
    """[image, metadata[i][key]] per image, for questions about two images; the reference must be a
    (3, H, W) tensor in [0, 1] (the reward ``name`` says so otherwise)."""
    if metadata is None:
        raise RewardInputError(f"{name} needs metadata rows with a '{key}'")
    pairs = []
    for image, row in zip(images, metadata):
        reference = row.get(key)
        if not isinstance(reference, Tensor) or reference.ndim != 3 or reference.shape[0] != 3:
            shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
            raise RewardInputError(f"{name}: metadata '{key}' must be a (3, H, W) tensor in [0, 1]; got {shape}")
        reference = reference.to(device, torch.float32)
        if reference.numel() and (reference.min() < -1e-3 or reference.max() > 1 + 1e-3):
            raise RewardInputError(f"{name}: metadata '{key}' must be in [0, 1]")
        pairs.append([image, reference])
    return pairs
