"""``genalign eval shapes`` as a library call: the gold score of a model (and of its base, paired
over the same prompts and seeds) on the held-out prompts, with the proxy reward and sample
diversity when asked; the lines printed and the files written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from genalign.core.types import Backbone
from genalign.shapes.scoring import clip_agreement, diversity, evaluate_backbone, paired_gain, proxy_reward
from genalign.shapes.world import TASKS


def evaluate_models(backbone: Backbone, lora: str | None = None, with_base: bool = False, per_task: int = 50,
                    steps: int = 25, guidance_scale: float = 2.0, seed: int = 0, clip: str | None = None,
                    diversity_k: int | None = None, split: str = "heldout") -> tuple[dict[str, Any], list[tuple[str, Tensor]]]:
    """Score ``backbone`` (the base first when ``with_base``, then with ``lora`` loaded) on ``split``'s
    prompts (``heldout``; ``train`` to choose settings without looking at the held-out ones): the
    report (``scores.json``'s content) and each model's images in evaluation order."""
    if with_base and not lora:
        raise ValueError("comparing with the base needs a LoRA to compare it with")
    settings = (per_task, steps, guidance_scale, seed)
    models: list[tuple[str, dict, Tensor]] = []  # (label, gold scores, images): the same seeds for every model
    verdicts, spread = [], {}
    labels = (["base"] if with_base else []) + ["fine-tuned" if lora else "model"]
    metas: list[dict] = []
    for label in labels:
        if label == "fine-tuned":
            backbone.load_lora(lora)  # type: ignore[arg-type,attr-defined]
        scores, images, metas, correct = evaluate_backbone(backbone, *settings, split=split)
        models.append((label, scores, images))
        verdicts.append(correct)
        if diversity_k:
            spread[label] = diversity(backbone, 5, diversity_k, steps, guidance_scale, seed)
    label, scores, images = models[-1]
    result: dict[str, Any] = {"gold": scores, "lora": lora, "per_task": per_task, "steps": steps,
                              "guidance_scale": guidance_scale, "seed": seed, "split": split,
                              "verdicts": verdicts[-1], "tags": [meta["tag"] for meta in metas],
                              "prompts": [meta["prompt"] for meta in metas]}
    if clip:
        result["proxy_reward"] = proxy_reward(clip, images, metas)
    if diversity_k:
        result["diversity"] = spread[label]
    if with_base:
        result["base"] = {"gold": models[0][1], "verdicts": verdicts[0]}
        result["gain"] = paired_gain(verdicts[0], verdicts[1], [meta["tag"] for meta in metas])
        if clip:
            result["base"]["proxy_reward"] = proxy_reward(clip, models[0][2], metas)
        if diversity_k:
            result["base"]["diversity"] = spread["base"]
    if clip:
        result["clip_agreement_on_ground_truth"] = clip_agreement(clip, per_task, seed)
    # the common report summary, so `genalign eval compare` reads shapes runs too
    result["summary"] = {"benchmark": "shapes", "tasks": {t: v for t, v in scores.items() if t != "overall"},
                         "overall": scores["overall"]}
    if clip:
        result["summary"]["proxy_reward"] = result["proxy_reward"]["overall"]
    if diversity_k:
        result["summary"]["diversity"] = result["diversity"]["overall"]
        result["diversity_k"] = diversity_k
    return result, [(label, images) for label, _, images in models]


def _line(values: dict) -> str:
    return ", ".join(f"{task} {values[task]:.3f}" for task in (*TASKS, "overall") if task in values)


def report_lines(result: dict[str, Any]) -> list[str]:
    """What ``genalign eval shapes`` prints about a report of :func:`evaluate_models`."""
    base = result.get("base")
    label = "fine-tuned" if result.get("lora") else "model"
    where = "held-out prompts" if result.get("split", "heldout") == "heldout" else "training prompts"
    lines = []
    if base:
        lines.append(f"gold score (exact evaluator, {where}), base: {_line(base['gold'])}")
    lines.append(f"gold score (exact evaluator, {where}), {label}: {_line(result['gold'])}")
    if base:
        lines.append(f"gold gain over the base, paired over the same prompts and seeds: {result['gain']['gain']:+.3f} "
                     f"(standard error {result['gain']['standard_error']:.3f})")
    if "proxy_reward" in result:
        if base:
            lines.append(f"proxy reward (CLIP score of the same images), base: {_line(base['proxy_reward'])}")
        lines.append(f"proxy reward (CLIP score of the same images), {label}: {_line(result['proxy_reward'])}")
    for name, values in ((("base", base.get("diversity")),) if base else ()) + ((label, result.get("diversity")),):
        if values:
            lines.append(f"diversity (mean pairwise RMS pixel distance, {result['diversity_k']} seeds x 5 prompts a "
                         f"task), {name}: {_line(values)}")
    if "clip_agreement_on_ground_truth" in result:
        lines.append("CLIP proxy top-1 prompt right by the gold evaluator (ground-truth images): "
                     + _line(result["clip_agreement_on_ground_truth"]))
    return lines


CELL, BORDER, CAPTION, LABEL, HEADER = 96, 3, 48, 120, 22  # the labelled grid's geometry, in pixels
PASS, FAIL = (30, 160, 60), (200, 40, 40)


def labelled_grid(models: list[tuple[str, Tensor]], verdicts: list[list[bool]], prompts: list[str], per_task: int,
                  per_row: int = 8) -> Any:
    """The first ``per_row`` images of each task, one task and model a row (base above fine-tuned),
    each framed green where the exact evaluator passes it and red where it fails, its verdict in
    words and its prompt under it (``caption``), the row's task and model on its left (a PIL image)."""
    from PIL import Image, ImageDraw, ImageFont

    per_row = min(per_row, per_task)
    font = ImageFont.load_default(size=11)
    row_height = CELL + CAPTION
    grid = Image.new("RGB", (LABEL + per_row * CELL, HEADER + len(TASKS) * len(models) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), "green frame, pass: passes the exact evaluator; red frame, FAIL: fails it", fill="black", font=font)
    inner = CELL - 2 * BORDER
    for t, task in enumerate(TASKS):
        for m, ((label, images), passed) in enumerate(zip(models, verdicts)):
            top = HEADER + (t * len(models) + m) * row_height
            draw.text((4, top + CELL // 2 - 12), f"{task}\n{label}", fill="black", font=font)
            for j in range(per_row):
                i = t * per_task + j
                left = LABEL + j * CELL
                draw.rectangle((left, top, left + CELL - 1, top + CELL - 1), fill=PASS if passed[i] else FAIL)
                pixels = (images[i].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
                grid.paste(Image.fromarray(pixels).resize((inner, inner), Image.NEAREST), (left + BORDER, top + BORDER))
                draw.multiline_text((left + 2, top + CELL + 1), caption(prompts[i], passed[i]), fill="black",
                                    font=font, spacing=0)
    return grid


def caption(prompt: str, passed: bool) -> str:
    """An image's caption in the grid: its verdict in words on a line of its own (the frame's colour
    alone is lost on a colour-blind reader and beside the world's red and green shapes), then its
    prompt in three lines."""
    return f"{'pass' if passed else 'FAIL'}\n{_wrap(prompt, 15, 3)}"


def _wrap(text: str, width: int, lines: int) -> str:
    """``text`` in at most ``lines`` lines of about ``width`` characters (the last one cut with ...)."""
    import textwrap

    wrapped = textwrap.wrap(text, width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 3] + "..."
    return "\n".join(wrapped)


def write_report(out: Path, result: dict[str, Any], models: list[tuple[str, Tensor]]) -> Path:
    """``scores.json`` and ``grid.png`` (:func:`labelled_grid`: the first images of each task, base
    above fine-tuned, framed by the evaluator's verdict, with their prompts) in ``out``; returns the grid's path."""
    out.mkdir(parents=True, exist_ok=True)
    verdicts = ([result["base"]["verdicts"]] if "base" in result else []) + [result["verdicts"]]
    labelled_grid(models, verdicts, result["prompts"], result["per_task"]).save(out / "grid.png")
    (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    return out / "grid.png"
