"""UnifiedReward (Wang et al. 2025, "Unified Reward Model for Multimodal Understanding and Generation";
CodeGoat24/UnifiedReward): a VLM (Qwen2.5-VL for the ``UnifiedReward-qwen`` checkpoints, LLaVA for
``UnifiedReward-7b-v1.5``) that writes its judgement; the reward is read from the reply.

``{name: unified_reward}`` scores one image (pointwise), with the published prompts (``template``):

- ``v1`` (default): ``inference_qwen/image_generation/qwen_point_score_image_generation.py``, the
  model lists the caption's elements then ``Final Score: N`` (1 to 5);
- ``flow_grpo``: Flow-GRPO's / DiffusionNFT's RL form of it (``flow_grpo/rewards.py``): "Based on the
  above criteria, assign a score from 1 to 5 after 'Final Score:'";
- ``acs``: UnifiedReward-2.0's ``point_score_ACS_image_generation.py``: ``Alignment / Coherence /
  Style Score (1-5): X``; the score is their weighted mean (``options.weights``, default equal;
  Pref-GRPO trains on alignment 1.4 and style 0.7), a dimension missing from a reply takes the
  batch's mean of it (Pref-GRPO), sub-scores ``unified_reward_alignment`` etc.

``{name: unified_reward_pair}`` compares the image (Image 1) with ``metadata[i]["reference_image"]``
(Image 2) with the published pairwise prompt (``qwen_pair_rank_image_generation.py``): 1 for "Image 1
is better", 0 for "Image 2 is better", 0.5 for "Both images are equally good" or no verdict.

``scoring``:

- ``parse`` (default, the published way): the greedy reply (``max_new_tokens``, default 512) read
  with flow_grpo's regex ``Final Score:\\s*([1-5](?:\\.\\d+)?)`` (0 when absent, as flow_grpo) or
  Pref-GRPO's ``(\\w+) Score \\(1-5\\):\\s*([0-5](?:\\.\\d+)?)``, or the pairwise phrases. Scores are
  on the model's 1-5 scale; flow_grpo's /5 is a reward weight of 0.2.
- ``expected`` (genalign's smoother form; pointwise v1 / flow_grpo, pairwise): the probability-weighted
  score at the score's position instead of its greedy digit: pointwise, sum_k k P(k) over 1..5 after
  the reply's text up to ``Final Score:`` (appended when the reply lacks it); pairwise, P(1) /
  (P(1) + P(2)) after the answer prefix ``Image `` (one forward pass, no generation, differentiable).

Config: ``path`` (required) a hub id or folder of the checkpoint; ``min_pixels`` / ``max_pixels``
(Qwen only) as for ``vlm``. Generation is not differentiable: only pairwise ``expected`` is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.rewards import register
from genalign.rewards.base import DTYPES, Metadata, RewardModel, check_options
from genalign.rewards.vlm import QWEN_FAMILIES, Pixels, VisionLanguageModel, load_vlm, reference_pairs

_CRITERIA = (
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, "
    "color accuracy, and overall aesthetic appeal.\n"
)
_POINT_INTRO = ("You are given a text caption and a generated image based on that caption. Your task is to evaluate "
                "this image based on two key criteria:\n")
TEMPLATES = {
    "v1": _POINT_INTRO + _CRITERIA
    + "Extract key elements from the provided text caption, evaluate their presence in the generated image using the "
    "format: 'element (type): value' (where value=0 means not generated, and value=1 means generated), and assign a "
    "score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]",
    "flow_grpo": _POINT_INTRO + _CRITERIA
    + "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as "
    "follows:\nText Caption: [{prompt}]",
    "acs": "You are presented with a generated image and its associated text caption. Your task is to analyze the "
    "image across multiple dimensions in relation to the caption. Specifically:\nProvide overall assessments for the "
    "image along the following axes (each rated from 1 to 5):\n- Alignment Score: How well the image matches the "
    "caption in terms of content.\n- Coherence Score: How logically consistent the image is (absence of visual "
    "glitches, object distortions, etc.).\n- Style Score: How aesthetically appealing the image looks, regardless of "
    "caption accuracy.\n\nOutput your evaluation using the format below:\n\nAlignment Score (1-5): X\nCoherence Score "
    "(1-5): Y\nStyle Score (1-5): Z\n\nYour task is provided as follows:\nText Caption: [{prompt}]",
}
PAIR_TEMPLATE = (
    "You are given a text caption and two generated images based on that caption. Your task is to evaluate and compare "
    "these images based on two key criteria:\n1. Alignment with the Caption: Assess how well each image aligns with "
    "the provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as "
    "described in the caption.\n2. Overall Image Quality: Examine the visual quality of each image, including "
    "clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nCompare both images using the above "
    "criteria and select the one that better aligns with the caption while exhibiting superior visual quality.\n"
    'Provide a clear conclusion such as "Image 1 is better.", "Image 2 is better." and "Both images are equally '
    'good."\nYour task is provided as follows:\nText Caption: [{prompt}]'
)
FINAL_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")  # flow_grpo/rewards.py
ACS_SCORE = re.compile(r"(\w+) Score \(1-5\):\s*([0-5](?:\.\d+)?)")  # Pref-GRPO fastvideo/rewards/unifiedreward.py
DIMENSIONS = ("alignment", "coherence", "style")
PAIR_VERDICTS = (("Image 1 is better", 1.0), ("Image 2 is better", 0.0), ("Both images are equally good", 0.5))


def final_score(reply: str) -> float:
    """The 1-5 score after ``Final Score:`` (flow_grpo's regex), 0 if there is none."""
    match = FINAL_SCORE.search(reply)
    return float(match.group(1)) if match else 0.0


def acs_scores(reply: str) -> dict[str, float]:
    """{dimension: score} of the ``X Score (1-5): v`` lines found (lowercase names)."""
    return {name.lower(): float(value) for name, value in ACS_SCORE.findall(reply) if name.lower() in DIMENSIONS}


def pair_verdict(reply: str) -> float:
    """1 if Image 1 wins, 0 if Image 2 wins, 0.5 for a tie or no verdict (the first phrase present)."""
    found = [(reply.find(phrase), value) for phrase, value in PAIR_VERDICTS if phrase in reply]
    return min(found)[1] if found else 0.5


def next_token_ids(vlm: VisionLanguageModel, prefix: str, candidates: Sequence[str]) -> list[int]:
    """The single token each candidate adds after ``prefix`` in this tokenizer (e.g. Qwen's "4" after
    "Final Score: ", LLaMA's "▁4" after "Final Score:")."""
    base = vlm.tokenizer.encode(prefix, add_special_tokens=False)
    ids = []
    for candidate in candidates:
        full = vlm.tokenizer.encode(prefix + candidate, add_special_tokens=False)
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ConfigError(f"the tokenizer does not write {candidate!r} as one token after {prefix!r}")
        ids.append(full[-1])
    return ids


def _answer_start(vlm: VisionLanguageModel, prefix: str, candidates: Sequence[str]) -> tuple[str, list[int]]:
    """(prefix, ids): the prefix with or without a trailing space, whichever makes each candidate one token."""
    try:
        return prefix + " ", next_token_ids(vlm, prefix + " ", candidates)
    except ConfigError:
        return prefix, next_token_ids(vlm, prefix, [" " + c for c in candidates])


@register("unified_reward")
class UnifiedReward(RewardModel):
    """UnifiedReward's pointwise judgement of (image, prompt); see the module docstring."""

    summary = "UnifiedReward: a VLM's 1-5 score of the image against the caption (its published prompts)"
    name = "unified_reward"
    differentiable = False
    pairwise = False
    templates: tuple[str, ...] = tuple(TEMPLATES)

    def __init__(self, vlm: VisionLanguageModel, pixels: Pixels, template: str = "v1", scoring: str = "parse",
                 max_new_tokens: int = 512, weights: Mapping[str, float] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(device, dtype)
        self.vlm, self.pixels, self.template, self.scoring = vlm, pixels, template, scoring
        self.max_new_tokens = max_new_tokens
        self.weights = dict(weights or dict.fromkeys(DIMENSIONS, 1.0))
        self.differentiable = self.pairwise and scoring == "expected"  # type: ignore[misc]

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> UnifiedReward:
        known = ("scoring", "max_new_tokens", "min_pixels", "max_pixels") + (() if cls.pairwise else ("template",
                                                                                                      "weights"))
        check_options(config.name, config.options, known)
        options = config.options
        template = str(options.get("template", "pair" if cls.pairwise else "v1"))
        if not cls.pairwise and template not in TEMPLATES:
            raise ConfigError(f"reward {config.name}: options.template must be one of {sorted(TEMPLATES)}, "
                              f"got {template!r}")
        scoring = str(options.get("scoring", "parse"))
        if scoring not in ("parse", "expected") or (scoring == "expected" and template == "acs"):
            raise ConfigError(f"reward {config.name}: options.scoring is parse or expected (expected reads one score: "
                              f"not with template acs); got {scoring!r}")
        weights = options.get("weights")
        if weights is not None and (not isinstance(weights, Mapping) or set(weights) - set(DIMENSIONS)
                                    or not sum(float(w) for w in weights.values()) > 0):
            raise ConfigError(f"reward {config.name}: options.weights maps {', '.join(DIMENSIONS)} to weights with a "
                              f"positive sum; got {weights!r}")
        if not config.path:
            raise ConfigError(f"reward {config.name} needs reward.path: a hub id or folder of a UnifiedReward "
                              "checkpoint, e.g. CodeGoat24/UnifiedReward-qwen-7b")
        device = torch.device(device)
        vlm = load_vlm(config, device)
        if cls.pairwise and vlm.family not in QWEN_FAMILIES:
            raise ConfigError(f"reward {config.name} shows two images: it needs a Qwen2-VL / Qwen2.5-VL checkpoint, "
                              f"'{config.path}' is {vlm.family!r}")
        pixels = vlm.pixels(options.get("min_pixels"), options.get("max_pixels"))
        weights = {k: float(v) for k, v in weights.items()} if weights is not None else None
        return cls(vlm, pixels, template, scoring, int(options.get("max_new_tokens", 512)), weights, device,
                   DTYPES[config.dtype])

    def questions(self, prompts: list[str]) -> list[str]:
        template = PAIR_TEMPLATE if self.pairwise else TEMPLATES[self.template]
        return [template.replace("{prompt}", prompt) for prompt in prompts]

    def images(self, images: Tensor, metadata: Metadata) -> list[list[Tensor]]:
        return [[image] for image in images]

    def replies(self, images: Tensor, prompts: list[str], metadata: Metadata) -> list[str]:
        """The model's greedy replies."""
        return self.vlm.generate(self.questions(prompts), self.images(images, metadata), self.pixels,
                                 self.max_new_tokens)

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        return self.score_with_subscores(images, prompts, metadata)[0]

    def score_with_subscores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[
            Tensor, dict[str, Tensor]]:
        if self.scoring == "expected":
            return self.expected(images, prompts, metadata), {}
        replies = self.replies(images, prompts, metadata)
        if self.template == "acs":
            return self.acs(replies)
        return torch.tensor([final_score(reply) for reply in replies], device=self.device), {}

    def acs(self, replies: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted mean of the three dimensions and each dimension's scores (sub-scores)."""
        parsed = [acs_scores(reply) for reply in replies]
        total = torch.zeros(len(replies), device=self.device)
        dimensions = {}
        for dimension in DIMENSIONS:
            found = [row[dimension] for row in parsed if dimension in row]
            fill = sum(found) / len(found) if found else 0.0  # Pref-GRPO: the batch's mean of the parsed ones
            values = torch.tensor([row.get(dimension, fill) for row in parsed], device=self.device)
            dimensions[f"{self.label}_{dimension}"] = values
            total = total + self.weights.get(dimension, 0.0) * values
        return total / sum(self.weights.values()), dimensions

    @torch.no_grad()
    def expected(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        """sum_k k P(k | image, question, the reply up to "Final Score:") over k = 1..5."""
        marker = "Final Score:"
        prefixes = []
        for reply in self.replies(images, prompts, metadata):
            at = reply.find(marker)
            prefixes.append(reply[:at] + marker if at >= 0 else reply.rstrip() + "\n" + marker)
        digits = [str(k) for k in range(1, 6)]
        spaced, ids = _answer_start(self.vlm, marker, digits)
        prefixes = [p + spaced[len(marker):] for p in prefixes]
        logprobs = self.vlm.next_token_logprobs(self.questions(prompts), self.images(images, metadata), self.pixels,
                                                prefixes)[:, ids]
        weights = logprobs.softmax(-1)  # renormalised over the five digits
        return weights @ torch.arange(1.0, 6.0, device=weights.device)


@register("unified_reward_pair")
class UnifiedRewardPair(UnifiedReward):
    """UnifiedReward's pairwise verdict on the image against ``metadata[i]["reference_image"]``."""

    summary = "UnifiedReward pairwise: does the image beat a reference image (its published prompt)"
    name = "unified_reward_pair"
    pairwise = True

    def images(self, images: Tensor, metadata: Metadata) -> list[list[Tensor]]:
        return reference_pairs(self.name, images, metadata, "reference_image", self.device)

    def score_with_subscores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[
            Tensor, dict[str, Tensor]]:
        if self.scoring == "parse":
            replies = self.replies(images, prompts, metadata)
            return torch.tensor([pair_verdict(reply) for reply in replies], device=self.device), {}
        prefix, ids = _answer_start(self.vlm, "Image", ["1", "2"])
        logprobs = self.vlm.next_token_logprobs(self.questions(prompts), self.images(images, metadata), self.pixels,
                                                [prefix] * len(prompts))[:, ids]
        return logprobs.softmax(-1)[:, 0], {}


__all__ = ["UnifiedReward", "UnifiedRewardPair", "acs_scores", "final_score", "pair_verdict"]
