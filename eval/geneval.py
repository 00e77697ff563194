"""GenEval (Ghosh et al. 2023) on the official file layouts.

- Prompts: the official ``evaluation_metadata.jsonl`` (one JSON row a line: ``tag``, ``include``,
  ``exclude``, ``prompt``); :func:`read_metadata` checks every row.
- Images: ``<outdir>/<index:05>/metadata.jsonl`` (that prompt's row) + ``samples/<n:05>.png``, 4 a
  prompt, as djghosh13/geneval generation/diffusers_generate.py writes them; :func:`generate`
  writes it from any generator, :func:`read_layout` reads any such folder (numbered sub-folders,
  images named by digits; other files are ignored, as the official evaluator does).
- Scoring: :func:`score_folder` runs a detector (genalign.core.detection.Detector: Mask2Former
  by default, OWLv2, or the shapes world's parser) and a colour classifier, then GenEval's rules
  (genalign.core.geneval), and returns rows in the official ``results.jsonl`` format (so
  GenEval's own summary_scores.py reads them) plus report records.

Numbers from the transformers Mask2Former differ slightly from the official mmdetection
checkpoint (another implementation and post-processing of the same architecture and data).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from genalign.core.detection import ColorClassifier, Detector
from genalign.core.geneval import (
    GenEvalOptions,
    check_metadata,
    color_function,
    evaluate,
    select_objects,
    summarise,
)
from genalign.eval.generate import Generator, generate_jobs, image_seed

IMAGES_PER_PROMPT = 4  # GenEval's protocol
_IMAGE_NAME = re.compile(r"\d+\.png")


def read_metadata(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a GenEval metadata file, checked (errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata {path} not found (the official file is "
                                "djghosh13/geneval prompts/evaluation_metadata.jsonl)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            check_metadata(row)
        except (json.JSONDecodeError, ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path}:{number}: not a GenEval metadata row: {err}") from err
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no metadata rows")
    return rows


def write_metadata(path: str | Path, metas: Sequence[Mapping[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(dict(m)) + "\n" for m in metas))


def generate(
    generator: Generator,
    metas: Sequence[Mapping[str, Any]],
    out: str | Path,
    images_per_prompt: int = IMAGES_PER_PROMPT,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Write GenEval's layout for ``metas`` into ``out`` (resuming: existing images are kept)."""
    out = Path(out)
    jobs = []
    for index, meta in enumerate(metas):
        check_metadata(meta)
        folder = out / f"{index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        meta_file = folder / "metadata.jsonl"
        if meta_file.exists() and json.loads(meta_file.read_text()) != dict(meta):
            raise ValueError(f"{folder} holds another prompt's images ({meta_file}); use a new output folder")
        meta_file.write_text(json.dumps(dict(meta)))
        jobs += [(meta["prompt"], image_seed(seed, index, n), folder / "samples" / f"{n:05d}.png")
                 for n in range(images_per_prompt)]
    generate_jobs(generator, jobs, batch_size, progress)
    return out


def read_layout(folder: str | Path) -> list[tuple[dict[str, Any], list[Path]]]:
    """(metadata row, its image paths) per prompt folder of a GenEval image folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"GenEval image folder {folder} not found")
    prompts = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_file = sub / "metadata.jsonl"
        if not meta_file.is_file():
            raise ValueError(f"{sub} has no metadata.jsonl (GenEval layout: <index>/metadata.jsonl + samples/)")
        try:
            meta = json.loads(meta_file.read_text())
            check_metadata(meta)
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{meta_file}: not a GenEval metadata row: {err}") from err
        samples = sub / "samples"
        images = sorted(p for p in samples.iterdir() if p.is_file() and _IMAGE_NAME.fullmatch(p.name)) \
            if samples.is_dir() else []
        if not images:
            raise ValueError(f"{samples} holds no images named like 00000.png")
        prompts.append((meta, images))
    if not prompts:
        raise ValueError(f"{folder} has no GenEval prompt folders (00000/, 00001/, ...)")
    return prompts


def load_image(path: Path) -> Image.Image:
    """An RGB image as GenEval reads it (EXIF orientation applied); a clear error when it does not decode."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image {path} does not decode: {err}") from err


def score_folder(
    folder: str | Path,
    detector: Detector,
    color_classifier: ColorClassifier | None = None,
    options: GenEvalOptions = GenEvalOptions(),
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score every image of a GenEval folder: (rows in the official results.jsonl format, report
    records). Colours come from ``color_classifier``, or from the detections themselves when it is
    None (detectors that know colours)."""
    jobs = [(meta, path) for meta, paths in read_layout(folder) for path in paths]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="scoring", unit="img")
    rows, records = [], []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        images = [load_image(path) for _, path in batch]
        detections = detector.detect(images)
        for (meta, path), image, found in zip(batch, images, detections):
            objects = select_objects(found, meta["tag"], options)
            verdict = evaluate(objects, meta, color_function(image, color_classifier), options.position_threshold)
            details = {name: [[*map(float, d.box), float(d.score)] for d in dets] for name, dets in objects.items()}
            rows.append({"filename": str(path), "tag": meta["tag"], "prompt": meta["prompt"],
                         "correct": verdict.correct, "reason": verdict.reason, "metadata": json.dumps(meta),
                         "details": json.dumps(details)})
            records.append({"task": meta["tag"], "prompt": meta["prompt"], "image": str(path),
                            "score": float(verdict.correct), "passed": verdict.correct, "reason": verdict.reason,
                            "details": {"clauses": list(verdict.clauses), "objects": details}})
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return rows, records


def write_results(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """results.jsonl as the official evaluator writes it (one JSON object a line)."""
    Path(path).write_text("".join(json.dumps(dict(r)) + "\n" for r in rows))


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """GenEval's summary (genalign.core.geneval.summarise): per task, overall, % correct images/prompts."""
    return summarise(rows)
