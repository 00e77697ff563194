"""Score any backbone on the shapes world's held-out prompts with the exact evaluator, and measure
how well a CLIP proxy reward agrees with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genalign.core.rollout import rollout
from genalign.core.types import Backbone
from genalign.shapes.evaluator import accuracy, evaluate
from genalign.shapes.world import all_prompts, evaluation_set, sample_example


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: list[str],
    num_steps: int = 25,
    guidance_scale: float = 2.0,
    seed: int = 0,
    batch_size: int = 100,
    eta: float = 0.0,
) -> Tensor:
    """Images (N, 3, H, W) in [0, 1] for ``prompts``; image i uses noise seeded by (seed, i)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        seeds = [seed * 1_000_003 + start + i for i in range(len(batch))]
        images.append(rollout(backbone, batch, num_steps, guidance_scale, eta, seeds=seeds,
                              generator=torch.Generator().manual_seed(seed)).images.cpu())
    return torch.cat(images)


def evaluate_backbone(
    backbone: Backbone,
    per_task: int = 50,
    num_steps: int = 25,
    guidance_scale: float = 2.0,
    seed: int = 0,
    split: str = "heldout",
) -> tuple[dict[str, float], Tensor, list[dict[str, Any]], list[bool]]:
    """Gold scores (per task and overall) of ``backbone`` on ``per_task`` prompts of each task, with
    the images, their metadata rows and each image's verdict (for :func:`paired_gain`)."""
    metas = evaluation_set(split, per_task=per_task, seed=seed)
    images = generate(backbone, [m["prompt"] for m in metas], num_steps, guidance_scale, seed)
    verdicts = [evaluate(image, meta)[0] for image, meta in zip(images, metas)]
    return accuracy(verdicts, metas), images, metas, verdicts


def paired_gain(base: Sequence[bool], tuned: Sequence[bool], tags: Sequence[str]) -> dict[str, Any]:
    """The gain in the overall gold score (the mean over tasks of each task's accuracy) of a model
    over the base, paired over images generated from the same prompts and seeds, with its standard
    error: per task the difference d_i = tuned_i - base_i of each image's correctness, gain =
    mean over tasks of mean(d), SE = sqrt(sum over tasks of var(d) / n_task) / n_tasks (sample
    variance, ddof 1; a task with one image adds no variance). Pairing removes the variance the two
    models share (prompts and seeds that are easy or hard for both)."""
    if not len(base) == len(tuned) == len(tags):
        raise ValueError(f"paired_gain needs one base and one tuned verdict per tag, got {len(base)}, {len(tuned)}, "
                         f"{len(tags)}")
    if not tags:
        raise ValueError("paired_gain needs at least one image")
    differences: dict[str, list[float]] = {}
    for b, t, tag in zip(base, tuned, tags):
        differences.setdefault(tag, []).append(float(t) - float(b))
    per_task = {tag: float(np.mean(d)) for tag, d in differences.items()}
    variance = sum(float(np.var(d, ddof=1)) / len(d) for d in differences.values() if len(d) > 1)
    return {"gain": float(np.mean(list(per_task.values()))),
            "standard_error": float(np.sqrt(variance)) / len(differences), "per_task": per_task}


def pooled_paired_gain(differences: Sequence[Sequence[float]], tags: Sequence[str]) -> dict[str, Any]:
    """A method's gain over the base pooled over training seeds, with one standard error for the
    training noise and the evaluation's noise together. ``differences[s][i]``: tuned minus base
    correctness of image i (its task ``tags[i]``; the images of every evaluation seed, one after the
    other) for the run of training seed s, every run scored on the same images' prompts and seeds.

    A seed-by-image design per task t: d_si = mu + a_s + b_i + e_si (seed, image, residual), so
    Var(gain) = sum_t (s_a^2 / S + s_b,t^2 / n_t + s_e,t^2 / (S n_t)) / T^2, with the seed effects
    pooled over tasks through each seed's task-balanced gain. gain = mean over s of g_s, g_s = the
    task-balanced mean of differences[s] (:func:`paired_gain`). SE^2 = SE_seeds^2 + SE_images^2 -
    R: SE_seeds = std(g_s, ddof 1) / sqrt(S), the training noise given these images; SE_images =
    :func:`paired_gain`'s SE of the per-image mean over seeds, the evaluation's (other noise seeds,
    and other prompts where a task's pool is larger than its share, would give another gain, the
    base's images included: every run shares them, so the seeds' spread cannot show their noise);
    each counts the residual once, and R = sum_t MS_e,t / (S n_t) / T^2 takes one count out (MS_e,t:
    the two-way residual mean square, sum r^2 / ((S - 1)(n_t - 1))). Unbiased for the variance; the
    SE is clamped at 0. With one seed: SE_seeds = R = 0, the one run's paired SE."""
    per_seed, seeds_error, table, residual = _seed_terms(differences, tags, "pooled_paired_gain")
    images_error = paired_gain([0.0] * len(tags), list(table.mean(axis=0)), tags)["standard_error"]
    variance = seeds_error**2 + images_error**2 - residual
    return {"gain": float(np.mean(per_seed)), "standard_error": float(np.sqrt(max(variance, 0.0))),
            "seeds_error": seeds_error, "images_error": images_error, "per_seed": per_seed}


def pooled_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], tags: Sequence[str]) -> dict[str, Any]:
    """Method A's pooled gain minus method B's, both scored on the same images (prompts and noise
    seeds) against the same base, with one standard error: ``a[s][i]`` and ``b[s][i]`` as
    :func:`pooled_paired_gain`'s ``differences`` (their training seeds independent, any number each).
    The base cancels image by image, so the evaluation's part is the paired SE of the per-image
    difference of the two methods' seed means, far less than the two gains' SEs added; the training
    noise is each method's seeds' spread, added: SE^2 = SE_seeds,A^2 + SE_seeds,B^2 + SE_images^2 -
    R_A - R_B (each residual counted once, as in :func:`pooled_paired_gain`)."""
    per_a, error_a, table_a, residual_a = _seed_terms(a, tags, "pooled_difference")
    per_b, error_b, table_b, residual_b = _seed_terms(b, tags, "pooled_difference")
    images_error = paired_gain([0.0] * len(tags), list(table_a.mean(axis=0) - table_b.mean(axis=0)), tags)["standard_error"]
    seeds_error = float(np.hypot(error_a, error_b))
    variance = seeds_error**2 + images_error**2 - residual_a - residual_b
    return {"difference": float(np.mean(per_a) - np.mean(per_b)), "standard_error": float(np.sqrt(max(variance, 0.0))),
            "seeds_error": seeds_error, "images_error": images_error, "per_seed_a": per_a, "per_seed_b": per_b}


def _seed_terms(differences: Sequence[Sequence[float]], tags: Sequence[str], who: str) -> tuple[list[float], float, np.ndarray, float]:
    """Per seed task-balanced gains, the seeds' SE, the seed-by-image table and the residual term R
    of :func:`pooled_paired_gain`."""
    if not differences:
        raise ValueError(f"{who} needs at least one training seed")
    if any(len(d) != len(tags) for d in differences):
        raise ValueError(f"{who} needs one difference per tag ({len(tags)}) for every seed, got "
                         f"{[len(d) for d in differences]}")
    zeros = [0.0] * len(tags)
    per_seed = [paired_gain(zeros, d, tags)["gain"] for d in differences]
    n = len(per_seed)
    seeds_error = float(np.std(per_seed, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    table = np.asarray(differences, dtype=float)
    residual = 0.0
    columns = np.asarray(tags)
    names = list(dict.fromkeys(tags))
    for name in names:
        d = table[:, columns == name]
        if n > 1 and d.shape[1] > 1:
            r = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0, keepdims=True) + d.mean()
            residual += float((r**2).sum()) / ((n - 1) * (d.shape[1] - 1)) / (n * d.shape[1])
    return per_seed, seeds_error, table, residual / len(names) ** 2


def paired_gold(before: Tensor, after: Tensor, metas: list[dict[str, Any]]) -> dict[str, Any]:
    """The exact evaluator on two image sets of the same prompts and seeds (``metas``, one per
    image): each set's per-image verdicts and gold scores, and the paired gain of ``after``."""
    verdicts_before = [evaluate(image, meta)[0] for image, meta in zip(before, metas)]
    verdicts_after = [evaluate(image, meta)[0] for image, meta in zip(after, metas)]
    tags = [meta["tag"] for meta in metas]
    return {"before": accuracy(verdicts_before, metas), "after": accuracy(verdicts_after, metas),
            "gain": paired_gain(verdicts_before, verdicts_after, tags), "verdicts_before": verdicts_before,
            "verdicts_after": verdicts_after, "tags": tags}


@torch.no_grad()
def clip_logits(reward: Any, images: Tensor, prompts: list[str]) -> Tensor:
    """logit_scale * cos(image, text) for every image x prompt pair -> (N_images, N_prompts), with
    the CLIP reward adapter's encoder (the same preprocessing and tokenisation as the reward)."""
    image_embeds = reward.encoder.image_embeds(images.float().to(reward.device))
    text_embeds = reward.encoder.text_embeds(prompts)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return reward.encoder.logit_scale * image_embeds @ text_embeds.T


def clip_agreement(clip_path: str, per_task: int = 50, seed: int = 0) -> dict[str, float]:
    """How often the CLIP proxy's top-1 prompt (among all prompts of the same task) is one that the
    gold evaluator says the image satisfies, on ground-truth images of held-out prompts."""
    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward

    reward = load_reward(RewardConfig(name="clip", path=clip_path))
    metas = evaluation_set("heldout", per_task=per_task, seed=seed)
    candidates: dict[str, list[dict[str, Any]]] = {}
    for meta in all_prompts():
        candidates.setdefault(meta["tag"], []).append(meta)
    hits: dict[str, list[bool]] = {}
    for i, meta in enumerate(metas):
        image, _ = sample_example(meta, seed=10_000 + i)
        pool = candidates[meta["tag"]]
        logits = clip_logits(reward, torch.from_numpy(image).permute(2, 0, 1)[None], [m["prompt"] for m in pool])
        best = pool[int(logits.argmax())]
        hits.setdefault(meta["tag"], []).append(evaluate(image, best)[0])
    result = {task: float(np.mean(v)) for task, v in hits.items()}
    result["overall"] = float(np.mean(list(result.values())))
    return result


@torch.no_grad()
def proxy_scores(clip_path: str, images: Tensor, prompts: list[str], batch_size: int = 100) -> Tensor:
    """The CLIP reward at ``clip_path`` of each of ``images`` against its prompt, (N,) on the host."""
    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward

    reward = load_reward(RewardConfig(name="clip", path=clip_path))
    return torch.cat([reward(images[i : i + batch_size].float().clamp(0, 1), prompts[i : i + batch_size])[0].cpu()
                      for i in range(0, len(prompts), batch_size)])


def proxy_reward(clip_path: str, images: Tensor, metas: list[dict[str, Any]], batch_size: int = 100) -> dict[str, float]:
    """Mean CLIP reward of generated ``images`` against their prompts, per task and overall (the
    quantity the fine-tuners optimise; its rise next to the gold score's shows reward hacking or not)."""
    scores = proxy_scores(clip_path, images, [m["prompt"] for m in metas], batch_size)
    per_task: dict[str, list[float]] = {}
    for meta, value in zip(metas, scores.tolist()):
        per_task.setdefault(meta["tag"], []).append(value)
    result = {task: float(np.mean(v)) for task, v in per_task.items()}
    result["overall"] = float(np.mean(list(result.values())))
    return result


def pairwise_distance(images: Tensor) -> float:
    """Mean RMS pixel distance over all pairs of ``images`` (K, 3, H, W) in [0, 1]; 0 when identical."""
    flat = images.float().flatten(1)
    distances = torch.cdist(flat[None], flat[None])[0] / flat.shape[1] ** 0.5
    first, second = torch.triu_indices(len(flat), len(flat), offset=1)
    return float(distances[first, second].mean())


@torch.no_grad()
def diversity(
    backbone: Backbone,
    prompts_per_task: int = 5,
    images_per_prompt: int = 4,
    num_steps: int = 25,
    guidance_scale: float = 2.0,
    seed: int = 0,
) -> dict[str, float]:
    """Sample diversity per task and overall: the mean pairwise RMS pixel distance between the
    ``images_per_prompt`` images (different seeds) of each of the first held-out prompts of a task.
    A model that collapsed onto one image per prompt scores near 0."""
    metas = evaluation_set("heldout", per_task=prompts_per_task, seed=seed)
    prompts = [m["prompt"] for m in metas for _ in range(images_per_prompt)]
    images = generate(backbone, prompts, num_steps, guidance_scale, seed + 1)
    per_task: dict[str, list[float]] = {}
    for i, meta in enumerate(metas):
        group = images[i * images_per_prompt : (i + 1) * images_per_prompt]
        per_task.setdefault(meta["tag"], []).append(pairwise_distance(group))
    result = {task: float(np.mean(v)) for task, v in per_task.items()}
    result["overall"] = float(np.mean(list(result.values())))
    return result


def pair_agreement(proxy: Sequence[float], gold: Sequence[float], groups: Sequence[int]) -> dict[str, float]:
    """How a proxy orders the pairs of samples of one prompt against the gold, the label a
    preference method (Diffusion-DPO, D3PO) or a within-prompt baseline (AC-Flow, GRPO) learns from.

    Over every pair i < j within a group (the samples of one prompt): ``decided``, the share of pairs
    whose gold scores differ; ``agree``, among those, the share the proxy orders as the gold does (a
    proxy tie counts a half; 0.5 is a coin); ``signal`` = (agreeing - disagreeing) / all pairs, the
    net share of pairs that tell a method the gold's order (0 for a random proxy, 1 for the gold
    itself, negative for a proxy that prefers the gold's loser). Standard errors are over groups
    (pairs of one prompt are not independent): the ratio estimator's for ``agree``, the groups'
    spread for ``decided`` and ``signal`` (each group's share weighted equally: groups are equal size).
    A group of one sample has no pairs and is left out.
    """
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(int(g), []).append(i)
    counts = []  # per group: decided pairs, agreeing (ties a half), agreeing - disagreeing, all pairs
    for members in by_group.values():
        d = a = s = n = 0.0
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                n += 1
                if gold[i] == gold[j]:
                    continue
                d += 1
                order = np.sign(proxy[i] - proxy[j]) * np.sign(gold[i] - gold[j])  # +1 agree, 0 tie, -1 not
                a += (order + 1) / 2
                s += order
        if n:
            counts.append((d, a, s, n))
    if not counts:
        raise ValueError("pair_agreement: no group has two samples")
    d_, a_, s_, n_ = np.array(counts).T
    g = len(counts)

    def spread(values: np.ndarray) -> float:
        return float(values.std(ddof=1) / np.sqrt(g)) if g > 1 else float("nan")

    agree = float(a_.sum() / d_.sum()) if d_.sum() else float("nan")
    ratio_se = float(np.sqrt(((a_ - agree * d_) ** 2).sum() / (g * (g - 1))) * g / d_.sum()) if g > 1 and d_.sum() else float("nan")
    return {"pairs": float(n_.sum()), "decided": float((d_ / n_).mean()), "decided_se": spread(d_ / n_),
            "agree": agree, "agree_se": ratio_se, "signal": float((s_ / n_).mean()), "signal_se": spread(s_ / n_)}


@torch.no_grad()
def proxy_pairs(backbone: Backbone, clip_path: str, split: str = "train", per_task: int = 25, samples: int = 4,
                num_steps: int = 10, guidance_scale: float = 2.0, eta: float = 0.0, shared_noise: bool = False,
                seed: int = 0) -> dict[str, dict[str, float]]:
    """:func:`pair_agreement` of the CLIP proxy at ``clip_path`` with the exact evaluator (its strict
    verdict, the leaderboard's, and its share of clauses, the gold reward's) on ``samples`` images
    of each of ``per_task`` prompts a task, sampled as a fine-tuner samples its pairs (``eta``,
    ``shared_noise``: D3PO's one initial noise a prompt); per task and over all tasks."""
    from genalign.shapes.reward import ShapesGold

    metas = evaluation_set(split, per_task=per_task, seed=seed)
    images = torch.cat([rollout(backbone, [m["prompt"] for m in metas[i : i + 25]], num_steps, guidance_scale, eta,
                                samples_per_prompt=samples, shared_noise=shared_noise,
                                generator=torch.Generator().manual_seed(seed * 1_000_003 + i)).images.cpu()
                        for i in range(0, len(metas), 25)])
    rows = [m for m in metas for _ in range(samples)]
    prompts = [m["prompt"] for m in rows]
    proxy = proxy_scores(clip_path, images, prompts).tolist()
    share, strict = (v.tolist() for v in ShapesGold().scores(images, prompts, rows))
    groups = [i // samples for i in range(len(rows))]
    result = {}
    for task in [*dict.fromkeys(m["tag"] for m in metas), "overall"]:
        keep = [i for i, m in enumerate(rows) if task in ("overall", m["tag"])]
        p, s, c, g = ([values[i] for i in keep] for values in (proxy, strict, share, groups))
        result[task] = {"strict": pair_agreement(p, s, g), "share": pair_agreement(p, c, g), "gold": float(np.mean(s))}
    return result
