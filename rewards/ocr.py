"""Text-rendering reward: does the image show the prompt's quoted text? Flow-GRPO's third standard
task (Liu et al. 2025, "Flow-GRPO"; ``flow_grpo/ocr.py``), read by GOT-OCR 2.0 (Wei et al. 2024,
``GotOcr2ForConditionalGeneration`` in transformers), so no second framework (PaddleOCR) is needed.

The target is the text between the prompt's first pair of double quotes (flow_grpo:
``prompt.split('"')[1]``), or ``metadata[i]["text"]`` where given. Two scorings:

- ``edit_distance`` (default; flow_grpo's reward, not differentiable): the OCR model reads the image
  (greedy decoding of GOT's plain ``OCR:`` query); recognised text and target lose their spaces and
  are lowercased; distance 0 if the target is a substring of the recognised text, else the Levenshtein
  distance, at most len(target); reward = 1 - distance / len(target), in [0, 1].
- ``likelihood`` (genalign's differentiable form): exp of the mean log-probability of the target's
  tokens and GOT's end-of-turn token, teacher-forced after the same query; in (0, 1]. It is stricter
  than the edit distance (case, spacing, nothing before the target); ``output: logprob`` gives the
  mean log-probability. The image processor runs on tensors, so gradients reach the pixels.

Config: ``{name: ocr}``; ``path`` a GOT-OCR 2.0 checkpoint (default ``stepfun-ai/GOT-OCR-2.0-hf``);
``options``: ``scoring``, ``output`` (``prob`` / ``logprob``, likelihood only), ``max_new_tokens``
(edit distance; default 64).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    check_options,
    checkpoint_layers,
    freeze,
)
from genalign.rewards.preprocess import normalize
from genalign.rewards.vlm import _check_rescale, _resample_mode, _resize_like_uint8

DEFAULT_PATH = "stepfun-ai/GOT-OCR-2.0-hf"
SCORINGS = ("edit_distance", "likelihood")


def quoted_text(prompt: str) -> str:
    """The text between the prompt's first pair of double quotes (flow_grpo's target)."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1]:
        raise RewardInputError(f'the ocr reward needs the text to render in double quotes in the prompt '
                               f'(or metadata "text"); got {prompt!r}')
    return parts[1]


def edit_distance_reward(recognised: str, target: str) -> float:
    """flow_grpo's OCR reward: 1 - min(d, len(t)) / len(t) on space-less lowercase strings, with
    d = 0 when the target appears in the recognised text, else their Levenshtein distance."""
    import Levenshtein

    recognised = recognised.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        raise RewardInputError("the ocr reward's target text has no characters besides spaces")
    distance = 0 if target in recognised else Levenshtein.distance(recognised, target)
    return 1.0 - min(distance, len(target)) / len(target)


class GotOCR:
    """GOT-OCR 2.0 (frozen) and its processor: the plain-text query, greedy reading, and the
    teacher-forced log-probability of a given text."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, checkpointing: bool = False):
        from transformers import AutoConfig, AutoProcessor, GotOcr2ForConditionalGeneration
        from transformers.modeling_layers import GradientCheckpointingLayer

        hint = f"Set reward.path to a local folder or hub id of a GOT-OCR 2.0 checkpoint (e.g. {DEFAULT_PATH})"
        config = from_pretrained_or_explain(AutoConfig, path, hint=hint, trust_remote_code=False)
        if config.model_type != "got_ocr2":
            raise ConfigError(f"reward.path '{path}' is a {config.model_type!r} model; the ocr reward reads with "
                              "GOT-OCR 2.0 (got_ocr2)")
        self.model = freeze(from_pretrained_or_explain(GotOcr2ForConditionalGeneration, path, hint=hint,
                                                       dtype=dtype)).to(device)
        self.processor = from_pretrained_or_explain(AutoProcessor, path, hint=hint, trust_remote_code=False)
        self.tokenizer = self.processor.tokenizer
        self.end_id = int(self.tokenizer.convert_tokens_to_ids(self.processor.message_end_token))
        vision = config.vision_config
        self.image_tokens = (vision.image_size // vision.patch_size // 4) ** 2  # the projector's output grid
        image_processor = self.processor.image_processor
        _check_rescale(image_processor)
        if getattr(image_processor, "crop_to_patches", False):
            raise NotImplementedError("GOT-OCR image processors that crop to patches are not reproduced")
        self.size = (int(image_processor.size["height"]), int(image_processor.size["width"]))
        self.mode = _resample_mode(image_processor.resample)
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        self.device, self.dtype = device, dtype
        self.query = self._query_ids()
        if checkpointing:
            checkpoint_layers(m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer))

    def pixels(self, images: Tensor) -> Tensor:
        """GotOcr2ImageProcessor on tensors: bicubic resize to its size, CLIP normalisation."""
        return normalize(_resize_like_uint8(images.float(), self.size, self.mode), self.mean, self.std).to(self.dtype)

    def _query_ids(self) -> Tensor:
        """(L,) token ids of GOT's plain OCR query with the image placeholders, as its processor writes
        it (the same for every image: built once, from a blank image)."""
        from PIL import Image

        blank = Image.new("RGB", self.size[::-1])
        inputs = self.processor(images=[blank], return_tensors="pt", num_image_tokens=self.image_tokens)
        return inputs["input_ids"][0].to(self.device)

    @torch.no_grad()
    def read(self, images: Tensor, max_new_tokens: int) -> list[str]:
        """The text GOT reads in each image (greedy)."""
        ids = self.query.expand(len(images), -1)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=self.pixels(images),
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.end_id,
                                  pad_token_id=self.tokenizer.pad_token_id or self.end_id)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)

    def text_logprobs(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """(B,) mean log P(text tokens, end of turn | image, query), fp32."""
        query = self.query
        answers = [self.tokenizer.encode(text, add_special_tokens=False) + [self.end_id] for text in texts]
        length = len(query) + max(len(answer) for answer in answers)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        input_ids = torch.full((len(texts), length), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(input_ids)
        for row, answer in enumerate(answers):  # right padding: the query sits at the same place in every row
            input_ids[row, : len(query) + len(answer)] = torch.cat([query, torch.tensor(answer, device=self.device)])
            mask[row, : len(query) + len(answer)] = 1
        logits = self.model(input_ids=input_ids, attention_mask=mask, pixel_values=self.pixels(images),
                            use_cache=False).logits  # (B, L, V)
        logprobs = logits[:, len(query) - 1 : -1].float().log_softmax(-1)  # predicting positions len(query)..
        targets = input_ids[:, len(query):]
        picked = logprobs.gather(-1, targets[..., None])[..., 0] * mask[:, len(query):]
        return picked.sum(-1) / mask[:, len(query):].sum(-1)


@register("ocr")
class OCRReward(RewardModel):
    """How well the image renders the prompt's quoted text (see the module docstring)."""

    summary = "OCR reward: 1 - edit distance of GOT-OCR's reading to the quoted text (Flow-GRPO)"
    name = "ocr"

    def __init__(self, ocr: GotOCR, scoring: str = "edit_distance", output: str = "prob", max_new_tokens: int = 64,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(device, dtype)
        self.ocr, self.scoring, self.output, self.max_new_tokens = ocr, scoring, output, max_new_tokens
        self.differentiable = scoring == "likelihood"  # type: ignore[misc]

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> OCRReward:
        check_options(config.name, config.options, ("scoring", "output", "max_new_tokens"))
        scoring = str(config.options.get("scoring", "edit_distance"))
        if scoring not in SCORINGS:
            raise ConfigError(f"reward {config.name}: options.scoring must be one of {SCORINGS}, got {scoring!r}")
        output = str(config.options.get("output", "prob"))
        if output not in ("prob", "logprob") or (output == "logprob" and scoring != "likelihood"):
            raise ConfigError(f"reward {config.name}: options.output is prob, or logprob with scoring: likelihood; "
                              f"got {output!r}")
        path, device, dtype = config.path or DEFAULT_PATH, torch.device(device), DTYPES[config.dtype]
        ocr = cached(("got_ocr2", path, str(device), dtype, config.gradient_checkpointing),
                     lambda: GotOCR(path, device, dtype, config.gradient_checkpointing))
        return cls(ocr, scoring, output, int(config.options.get("max_new_tokens", 64)), device, dtype)

    def targets(self, prompts: list[str], metadata: Metadata) -> list[str]:
        rows: Sequence[Any] = metadata if metadata is not None else [{}] * len(prompts)
        return [str(row["text"]) if row.get("text") else quoted_text(prompt) for prompt, row in zip(prompts, rows)]

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        targets = self.targets(prompts, metadata)
        if self.scoring == "edit_distance":
            read = self.ocr.read(images, self.max_new_tokens)
            return torch.tensor([edit_distance_reward(text, target) for text, target in zip(read, targets)],
                                device=self.device)
        logprobs = self.ocr.text_logprobs(images, targets)
        return logprobs if self.output == "logprob" else logprobs.exp()
