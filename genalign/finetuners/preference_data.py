"""Preference pairs for the DPO-family methods: online (sample several images per prompt, rank
them with a reward) and offline (Pick-a-Pic v2 format read with Hugging Face datasets).

A pair is (prompt, winner latents, loser latents); the methods receive latents, so offline images
are VAE-encoded when a batch is collected.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genalign.core.config import ConfigError
from genalign.core.rollout import rollout
from genalign.core.types import Backbone, Conditioning, Reward
from genalign.finetuners.common import OverlappedScores


@dataclass
class PairBatch:
    """Winner/loser latents (N, C, h, w) for N prompts with their (guidance-free) conditioning."""

    cond: Conditioning
    x0_w: Tensor
    x0_l: Tensor
    prompts: list[str]
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x0_w.shape[0]


def rank_pairs(scores: Tensor, samples_per_prompt: int, min_gap: float) -> tuple[Tensor, Tensor, Tensor]:
    """For scores (P * k,) grouped k per prompt: indices of each prompt's best and worst sample and
    a mask of the prompts whose best - worst gap exceeds ``min_gap`` (ties give no pair)."""
    grouped = scores.view(-1, samples_per_prompt)  # (P, k)
    base = torch.arange(grouped.shape[0], device=scores.device) * samples_per_prompt
    best, worst = grouped.argmax(1), grouped.argmin(1)
    gap = grouped.max(1).values - grouped.min(1).values
    return base + best, base + worst, gap > min_gap


@torch.no_grad()
def online_pairs(
    backbone: Backbone,
    reward: Reward,
    prompts: Sequence[str],
    generator: torch.Generator,
    samples_per_prompt: int = 2,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
    from_reference: bool = False,
    min_gap: float = 0.0,
    chunk_size: int | None = None,
) -> PairBatch:
    """Sample ``samples_per_prompt`` images per prompt (from the reference model or the current
    policy, ``chunk_size`` at a time), score them with ``reward`` (a served one scores each chunk
    while the next samples) and keep each prompt's best and worst as a pair."""
    prompts = list(prompts)
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]  # as rollout orders them
    overlapped = OverlappedScores.for_reward(reward, repeated)
    with overlapped or nullcontext(), backbone.reference() if from_reference else nullcontext():
        r = rollout(backbone, prompts, num_steps, guidance_scale, eta, samples_per_prompt=samples_per_prompt,
                    generator=generator, chunk_size=chunk_size, on_chunk=overlapped)
        scores = overlapped.result().to(r.images.device) if overlapped is not None else reward(r.images, repeated)[0]
    cond, images = r.cond, r.images
    winners, losers, keep = rank_pairs(scores.to(images.device), samples_per_prompt, min_gap)
    winners, losers = winners[keep], losers[keep]
    kept = keep.nonzero().squeeze(1).tolist()
    # the winners' rows of the sampling conditioning, without its guidance branch: no re-encoding
    chosen = cond.select(winners)
    pair_cond = Conditioning(chosen.positive, None, chosen.prompts)
    metrics = {
        "reward_mean": scores.mean(),
        "reward_w": scores[winners].mean() if kept else scores.new_tensor(0.0),
        "reward_l": scores[losers].mean() if kept else scores.new_tensor(0.0),
        "pairs_kept": scores.new_tensor(float(len(kept))),
    }
    return PairBatch(pair_cond, r.trajectory.final[winners], r.trajectory.final[losers], [prompts[i] for i in kept], metrics)


# ------------------------------------------------------------------ offline (Pick-a-Pic v2 format)


def load_pick_a_pic(source: str, split: str = "train") -> Any:
    """A Pick-a-Pic v2-format dataset (columns ``jpg_0``, ``jpg_1``, ``label_0``, ``caption``) from
    a hub id, a folder saved with ``save_to_disk``, or local parquet file(s) / a folder of them."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            data = datasets.load_from_disk(str(path))
        elif path.is_dir() or path.suffix == ".parquet":
            files = sorted(str(f) for f in path.rglob("*.parquet")) if path.is_dir() else [str(path)]
            if not files:
                raise ConfigError(f"no parquet files under {path}")
            data = datasets.load_dataset("parquet", data_files={split: files})
        else:
            data = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        raise ConfigError(f"cannot read the preference dataset {source!r} (split {split!r}): {err}") from err
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ConfigError(f"preference dataset {source!r} has splits {list(data)}, not {split!r}")
        data = data[split]
    missing = {"jpg_0", "jpg_1", "label_0", "caption"} - set(data.column_names)
    if missing:
        raise ConfigError(f"preference dataset {source!r} lacks Pick-a-Pic columns {sorted(missing)}")
    return data


def preference_rows(data: Any, bad_rows: str = "error") -> list[int]:
    """Rows with a strict preference (``label_0`` 0 or 1; ties of 0.5 dropped, as in Diffusion-DPO).
    A label outside {0, 0.5, 1} is an error naming its rows, or (``bad_rows="skip"``) reported once
    and skipped."""
    labels = data["label_0"]
    bad = [i for i, label in enumerate(labels) if label not in (0, 0.5, 1)]
    if bad:
        shown = ", ".join(f"row {i}: {labels[i]!r}" for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        if bad_rows != "skip":
            raise ConfigError(f"preference dataset: {len(bad)} label_0 value(s) outside {{0, 0.5, 1}} ({shown}); "
                              "fix them or set method.bad_rows=skip")
        print(f"genalign: skipping {len(bad)} preference row(s) with label_0 outside {{0, 0.5, 1}} ({shown})",
              file=sys.stderr)
    return [i for i, label in enumerate(labels) if label in (0, 1)]


def decode_image(value: Any, where: str = "dataset image") -> Any:
    """A PIL image from a datasets cell: raw bytes, {"bytes": ...} or an Image feature; a
    ValueError naming ``where`` when it does not decode."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, bytes | bytearray):
            value = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            value = Image.open(value)
        if not hasattr(value, "convert"):
            raise TypeError(f"expected image bytes, a path or an image, got {type(value).__name__}")
        return value.convert("RGB")
    except (UnidentifiedImageError, OSError, TypeError) as err:
        raise ValueError(f"{where} does not decode: {err}") from err


def image_to_tensor(image: Any, resolution: int, generator: torch.Generator, random_crop: bool, hflip: bool) -> Tensor:
    """The Diffusion-DPO training transform: resize the short side to ``resolution`` (bilinear), crop
    (random or centre), random horizontal flip; -> (3, r, r) in [0, 1]."""
    import numpy as np
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    image = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))),
                         Image.BILINEAR)
    width, height = image.size
    if random_crop:
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    else:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    if hflip and bool(torch.rand((), generator=generator) < 0.5):
        pixels = pixels.flip(-1)
    return pixels


@torch.no_grad()
def offline_pairs(
    backbone: Backbone,
    data: Any,
    rows: Sequence[int],
    generator: torch.Generator,
    random_crop: bool = False,
    hflip: bool = True,
    skip_bad_rows: bool = False,
    sample_posterior: bool = False,
) -> PairBatch:
    """Encode the rows' winner (first after flipping by ``label_0``) and loser images to latents: the
    VAE posterior's mean, or with ``sample_posterior`` a draw from it (``generator``), as the official
    Diffusion-DPO and Inversion-DPO scripts do (``latent_dist.sample()``). Both images of a pair get
    the same crop offset draw and flip. An image that does not decode is an error naming its row, or
    with ``skip_bad_rows`` reported and its row left out of the batch."""
    resolution = backbone.resolution
    winners, losers, prompts = [], [], []
    skipped = 0
    for row in rows:
        record = data[int(row)]
        try:
            first, second = (decode_image(record[key], f"row {int(row)} column {key!r} of the preference dataset")
                             for key in ("jpg_0", "jpg_1"))
        except ValueError as err:
            if not skip_bad_rows:
                raise ValueError(f"{err} (set method.bad_rows=skip to skip such rows)") from err
            print(f"genalign: skipping preference {err}", file=sys.stderr)
            skipped += 1
            continue
        if float(record["label_0"]) == 0.0:
            first, second = second, first
        state = generator.get_state()
        winners.append(image_to_tensor(first, resolution, generator, random_crop, hflip))
        generator.set_state(state)  # the same crop and flip for the loser
        losers.append(image_to_tensor(second, resolution, generator, random_crop, hflip))
        prompts.append(str(record["caption"]))
    if not winners:
        raise ValueError(f"no image of the preference rows {list(rows)[:8]} decodes")
    images = torch.stack(winners + losers).to(backbone.device)
    latents = backbone.encode(images, generator) if sample_posterior else backbone.encode(images)
    cond = backbone.encode_prompts(prompts, guidance=False)
    n = len(winners)
    return PairBatch(cond, latents[:n], latents[n:], prompts,
                     {"pairs_kept": torch.tensor(float(n)), "rows_skipped": torch.tensor(float(skipped))})
