"""T2I-CompBench (Huang et al., NeurIPS 2023) and T2I-CompBench++ (TPAMI 2025) scoring on the
official prompt files and image layout.

- Prompts: ``{category}_val.txt`` (one prompt a line; :func:`read_prompts`), categories
  :data:`CATEGORIES`.
- Images: one folder per category, ``<root>/<category>/`` or its ``samples/`` sub-folder (the
  official ``--outpath`` layout), named ``{prompt}_{NNNNNN}.png``, the number counting on across
  prompts, 10 images a prompt (GORS_finetune/inference_eval.py); :func:`generate` writes it. :func:`read_image_folder`
  reads it; an image's prompt is its name up to the last ``_`` (the official scripts cut at the
  first ``_``, the same for every official prompt: none holds one).
- Scoring: :func:`score_folder` (categories of a root folder) or :func:`score_images` (one
  category's images) returns report records and a summary for ``genalign.eval.report``.

Scorers, each a soft score in [0, 1] per image, averaged per category:

- color / shape / texture: BLIP-VQA asks "{noun phrase}?" for each noun chunk of the prompt and
  multiplies P(yes) (BLIPvqa_eval/BLIP_vqa.py).
- spatial: a detector finds the prompt's first and last noun; 0.25 * confidence of each + half
  the position rule's score, 0 below 0.5 (UniDet_eval/2D_spatial_eval.py).
- non_spatial: cosine similarity of CLIP ViT-B/32 image and prompt (CLIPScore_eval/CLIP_similarity.py).
- complex: the 3-in-1 mean of BLIP-VQA, the 2D score on the nouns around the spatial phrase, and
  CLIP on the prompt without adjectives, by the prompt's kind (3_in_1_eval/3_in_1.py).
- numeracy (++): per counted object, half for detecting it and half for the exact count
  (UniDet_eval/numeracy_eval.py).
- 3d_spatial (++): like spatial, with "in front of" / "behind" / "hidden" decided on a depth map's
  mean over each box (UniDet_eval/3D_spatial_eval.py).

Where the numbers can differ from the official ones:

- BLIP: ``Salesforce/blip-vqa-base`` is transformers' conversion of the official checkpoint
  (BLIP's model_base_vqa_capfilt_large.pth) stored at 384 px; it runs here at the official 480 px
  (position embeddings interpolated back) with transformers' resizing, and P(yes) is not rounded
  to 4 decimals as the official writes it: close, not bit-equal.
- Detector: the official UniDet (RS200 for 2D, R50 for numeracy and 3D; a unified label space of
  several hundred classes) is not in transformers; any :class:`~genalign.core.detection.Detector`
  is used. The CLI's default is the open-vocabulary OWLv2: COCO's 80 classes (Mask2Former) name
  both objects of only 80 of the 300 spatial validation prompts (73 of 300 3D, 309 of 736 numeracy
  targets), so every summary states per category how many prompts' objects the detector can name
  (:func:`vocabulary_coverage`). A closed-vocabulary detector is run without labels so that the
  official matching applies (exact names in 2D, a label containing the word in 3D and numeracy).
  Classes, boxes and confidences differ from UniDet's, and confidences enter the 2D and 3D scores.
- Depth: DPT-Hybrid MiDaS (``Intel/dpt-hybrid-midas``), the official model; the official stored
  depth as 8-bit PNGs, here it stays float.
- Nouns: spaCy ``en_core_web_sm`` when installed, else the rule parser of
  :mod:`genalign.eval.noun_phrases` (named in the summary): the BLIP questions and complex-prompt
  nouns of long prompts can differ.
- Complex kinds: the official lists ``complex_val_spatial.txt`` / ``complex_val_action.txt``
  when found beside the prompts, else a rule (:func:`complex_kind`) that agrees with them on 299
  of the 300 val prompts (not on "The fiery, blazing sun sank below the horizon, ...").

Official behaviours kept so that numbers stay comparable: "on top of" is in the 2D vocabulary but
has no position rule (score 0, so the 2D part of a complex "on top of" prompt is 0); the 3D depth
region is read as ``depth[x1:x2, y1:y2]`` (x as the row; ``official_depth_lookup``); a prompt
without noun chunks gets BLIP score 1; "television" is not renamed for numeracy (the official
rename is spelt "telivision").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from genalign.core.detection import Detection, Detector, box_iou
from genalign.core.loading import from_pretrained_or_explain
from genalign.eval.generate import Generator, generate_jobs, image_seed
from genalign.eval.noun_phrases import Parser, load_parser, nouns, without_adjectives

BENCHMARK = "t2i_compbench"
ATTRIBUTE_CATEGORIES = ("color", "shape", "texture")
CATEGORIES = (*ATTRIBUTE_CATEGORIES, "spatial", "non_spatial", "complex", "numeracy", "3d_spatial")
DETECTOR_CATEGORIES = ("spatial", "complex", "numeracy", "3d_spatial")
IMAGES_PER_PROMPT = 10  # GORS_finetune/inference_eval.py: --n_iter 10, batch size 1

DEFAULT_BLIP = "Salesforce/blip-vqa-base"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # CLIPScore_eval/CLIP_similarity.py: clip.load("ViT-B/32")
DEFAULT_DEPTH = "Intel/dpt-hybrid-midas"  # UniDet_eval/experts/model_bank_3d.py: DPT-Hybrid (MiDaS v3)

# UniDet_eval/2D_spatial_eval.py: vocab_spatial, searched in this order as substrings of the prompt
SPATIAL_RELATIONS = ("on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of",
                     "on the top of", "on top of")
# UniDet_eval/3D_spatial_eval.py: vocab_spatial_3d
SPATIAL_3D_RELATIONS = ("in front of", "behind", "hidden")
# UniDet_eval/2D_spatial_eval.py --complex: the phrases whose neighbouring nouns are the two objects
COMPLEX_PREPOSITIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near")
PERSON_WORDS = ("girl", "boy", "man", "woman")  # 2D / 3D / numeracy: detected as "person"
# BLIPvqa_eval/BLIP_vqa.py: noun chunks never asked about
EXCLUDED_CHUNKS = ("top", "the side", "the left", "the right")

# UniDet_eval/numeracy_eval.py: the counted objects (examples/dataset/new_objects.txt, singular:plural,
# "+s" when the plural adds an s) and the number words with their counts
NUMERACY_OBJECTS: dict[str, str] = dict(
    (word.split(":") if ":" in word else (word, word + "s")) for word in (
        "bottle cup cake bird knife:knives microwave desk book helmet pillow bowl flag stool toy pen microphone "
        "bread fish:fish camera candle paddle drum guitar tomato:tomatoes tent kite lemon "
        "strawberry:strawberries suitcase pear printer duck hamburger deer:deer egg ship chicken peach:peaches "
        "helicopter swan camel goldfish:goldfish shrimp:shrimp banana balloon giraffe frog horse man:men rabbit "
        "bicycle bee girl mouse:mice painting lamp cow train vase pig sheep:sheep airplane woman:women phone boy "
        "plate computer couch:couches turtle bag car backpack dog television butterfly:butterflies cat "
        "person:people table sofa key refrigerator clock chair truck boat bear sink apple").split()
)
NUMBER_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                 "eight": 8}
SINGULAR_WORDS = ("a", "an", "one")
# UniDet_eval/numeracy_eval.py: prompt words renamed to UniDet's label names before matching
NUMERACY_RENAMES = {"boy": "person", "girl": "person", "man": "person", "woman": "person", "ship": "boat",
                    "goldfish": "fish", "painting": "picture"}

# --- options -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompBenchOptions:
    """Settings of the scorers; the defaults are the official ones (file named per field)."""

    detection_threshold: float = 0.5
    """Detections at or below this confidence are dropped (UniDet_eval/experts/model_bank.py
    --confidence-threshold 0.5; detectron2 keeps scores above it)."""
    iou_threshold: float = 0.1
    """2D left / right / top / bottom: an IoU at or above it scales the position score by
    threshold / IoU (2D_spatial_eval.py determine_position)."""
    distance_threshold: float = 150.0
    """2D next to / near / on side of: centres closer than this in x or y (detector-frame pixels)
    score 1, else threshold / max distance (2D_spatial_eval.py)."""
    spatial_floor: float = 0.5
    """A 2D score below this becomes 0 (2D_spatial_eval.py: ``if score < 0.5: score = 0``)."""
    iou_threshold_3d: float = 0.5
    """3D: boxes overlapping above it score 1 when the depth order is right; overlap in (0, it)
    scores IoU / it (3D_spatial_eval.py)."""
    official_depth_lookup: bool = True
    """3D: read a box's depth region as ``depth[x1:x2, y1:y2]`` as the official code does (x as
    the row index); False reads ``depth[y1:y2, x1:x2]``."""
    detector_short_side: int = 479
    """Boxes are scored in the frame of the image resized to this short side, its long side at
    most ``detector_max_side`` (UniDet's transform Resize(size=479, max_size=480)): the 150 px
    distance threshold and the depth lookup are in that frame."""
    detector_max_side: int = 480
    max_noun_phrases: int = 8
    """BLIP asks about at most this many noun chunks (BLIP_vqa.py --np_num 8)."""
    images_per_prompt: int | None = IMAGES_PER_PROMPT
    """Every prompt of a folder must have this many images (None: any number)."""
    batch_size: int = 16
    """Images per model call."""


# --- prompts and layout ------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of an official prompt file: one a line, its first tab-separated field, blank
    lines skipped (GORS_finetune/inference_eval.py reads them so)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"T2I-CompBench prompt file {path} not found (the official files are "
                                "examples/dataset/<category>_val.txt of Karine-Huang/T2I-CompBench)")
    prompts = [line.split("\t")[0].strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def check_category(category: str) -> str:
    if category not in CATEGORIES:
        raise ValueError(f"unknown T2I-CompBench category {category!r}; known: {', '.join(CATEGORIES)}")
    return category


def prompt_file(data_dir: str | Path, category: str, split: str = "val") -> Path:
    """``<data_dir>/<category>_<split>.txt``, the official file name."""
    return Path(data_dir) / f"{check_category(category)}_{split}.txt"


def read_complex_split(data_dir: str | Path, split: str = "val") -> tuple[list[str], list[str]] | None:
    """The official complex kinds, (spatial prompts, action prompts), from
    ``complex_<split>_spatial.txt`` and ``complex_<split>_action.txt`` when both are in ``data_dir``."""
    files = [Path(data_dir) / f"complex_{split}_{kind}.txt" for kind in ("spatial", "action")]
    if not all(f.is_file() for f in files):
        return None
    return read_prompts(files[0]), read_prompts(files[1])


@dataclass(frozen=True)
class ImageEntry:
    """One image of the layout: its ``path``, ``prompt`` and ``index`` (the NNNNNN of its name)."""

    path: Path
    prompt: str
    index: int


_IMAGE_NAME = re.compile(r"(?P<prompt>.+)_(?P<index>\d+)\.(?:png|jpg|jpeg|webp)", re.IGNORECASE)


def image_name(prompt: str, index: int) -> str:
    """``{prompt}_{index:06d}.png`` (GORS_finetune/inference_eval.py)."""
    if "/" in prompt or "\0" in prompt:
        raise ValueError(f"prompt {prompt!r} cannot be a file name (it holds '/')")
    return f"{prompt}_{index:06d}.png"


def parse_image_name(name: str) -> tuple[str, int]:
    """(prompt, index) of an image file name ``{prompt}_{NNNNNN}.png``: the prompt is the name up to
    the last ``_``."""
    match = _IMAGE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"image file {name!r} is not named like '<prompt>_<NNNNNN>.png' (T2I-CompBench layout)")
    return match.group("prompt"), int(match.group("index"))


def image_folder(root: str | Path, category: str) -> Path:
    """The image folder of ``category`` under ``root``: ``<root>/<category>`` (its ``samples/`` when it has one)."""
    return Path(root) / check_category(category)


def read_image_folder(folder: str | Path, images_per_prompt: int | None = IMAGES_PER_PROMPT) -> list[ImageEntry]:
    """The images of one category folder (or of its ``samples/``), sorted by index. Hidden files
    and interrupted writes (``*.partial.png``) are skipped; any other file must follow the layout,
    each index may appear once, and each prompt must have ``images_per_prompt`` images."""
    folder = Path(folder)
    if (folder / "samples").is_dir():
        folder = folder / "samples"
    if not folder.is_dir():
        raise FileNotFoundError(f"T2I-CompBench image folder {folder} not found")
    entries, seen = [], {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.endswith(".partial.png") or not path.is_file():
            continue
        try:
            prompt, index = parse_image_name(path.name)
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        if index in seen:
            raise ValueError(f"{folder}: index {index} appears twice ({seen[index]!r} and {path.name!r})")
        seen[index] = path.name
        entries.append(ImageEntry(path, prompt, index))
    if not entries:
        raise ValueError(f"{folder} holds no images named like '<prompt>_<NNNNNN>.png'")
    entries.sort(key=lambda e: e.index)
    if images_per_prompt is not None:
        counts: dict[str, int] = {}
        for entry in entries:
            counts[entry.prompt] = counts.get(entry.prompt, 0) + 1
        wrong = {p: n for p, n in counts.items() if n != images_per_prompt}
        if wrong:
            shown = ", ".join(f"{p!r}: {n}" for p, n in list(wrong.items())[:3])
            raise ValueError(f"{folder}: {len(wrong)} prompt(s) do not have {images_per_prompt} images ({shown}"
                             f"{', ...' if len(wrong) > 3 else ''})")
    return entries


def load_image(path: Path) -> Image.Image:
    """An RGB image (``Image.open(path).convert('RGB')``, as the official scripts read it), or an
    error naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image {path} does not decode: {err}") from err


def generate(
    generator: Generator,
    prompts: Sequence[str],
    folder: str | Path,
    images_per_prompt: int = IMAGES_PER_PROMPT,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Write one category's images into ``folder`` as ``{prompt}_{NNNNNN}.png``, prompt i's images
    numbered i * images_per_prompt + n (resuming: existing images are kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(prompt, image_seed(seed, i, n), folder / image_name(prompt, i * images_per_prompt + n))
            for i, prompt in enumerate(prompts) for n in range(images_per_prompt)]
    generate_jobs(generator, jobs, batch_size, progress)
    return folder


# --- the rules ---------------------------------------------------------------------------------------


def find_relation(prompt: str, relations: Sequence[str]) -> str | None:
    """The first of ``relations`` found in the prompt as a substring (the official search), or None."""
    return next((relation for relation in relations if relation in prompt), None)


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def position_score_2d(relation: str | None, box1: Sequence[float], box2: Sequence[float],
                      iou_threshold: float = 0.1, distance_threshold: float = 150.0) -> float:
    """How well object 1 (box1) stands ``relation`` object 2 (UniDet_eval/2D_spatial_eval.py
    determine_position). Centre offsets dx, dy = centre2 - centre1 (image y points down):

    - next to / on side of / near: 1 if |dx| or |dy| < distance_threshold, else threshold / max(|dx|, |dy|);
    - on the left of (dx > 0), on the right of (dx < 0): the horizontal offset must dominate,
      |dx| > |dy|; on the top of (dy > 0), on the bottom of (dy < 0): |dy| > |dx|; then 1 when
      IoU < iou_threshold, else iou_threshold / IoU;
    - anything else, "on top of" included (it has no rule there): 0.
    """
    (x1, y1), (x2, y2) = _centre(box1), _centre(box2)
    dx, dy = x2 - x1, y2 - y1
    if relation in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    directions = {"on the left of": (dx > 0, abs(dx), abs(dy)), "on the right of": (dx < 0, abs(dx), abs(dy)),
                  "on the top of": (dy > 0, abs(dy), abs(dx)), "on the bottom of": (dy < 0, abs(dy), abs(dx))}
    if relation not in directions:
        return 0.0
    right_side, along, across = directions[relation]
    if not right_side or along <= across:
        return 0.0
    iou = box_iou(box1, box2)
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def box_depth(depth: np.ndarray, box: Sequence[float], official_lookup: bool = True) -> float:
    """Mean of the depth map over a box, its corners truncated to ints; ``official_lookup`` reads
    ``depth[x1:x2, y1:y2]`` as UniDet_eval/3D_spatial_eval.py does (x indexing rows), else
    ``depth[y1:y2, x1:x2]``. NaN for an empty region."""
    x1, y1, x2, y2 = (int(v) for v in box)
    region = depth[x1:x2, y1:y2] if official_lookup else depth[y1:y2, x1:x2]
    return float(region.mean()) if region.size else math.nan


def position_score_3d(relation: str | None, box1: Sequence[float], box2: Sequence[float], depth: np.ndarray,
                      iou_threshold: float = 0.5, official_lookup: bool = True) -> float:
    """How well object 1 is ``relation`` ("in front of", "behind", "hidden") object 2 on a relative
    inverse-depth map (larger = nearer, as MiDaS / DPT predict; UniDet_eval/3D_spatial_eval.py):
    "in front of" needs mean depth 1 > mean depth 2, "behind" / "hidden" the reverse; then 1 when
    IoU > iou_threshold, IoU / iou_threshold when 0 < IoU < iou_threshold, 0 without overlap."""
    if relation not in SPATIAL_3D_RELATIONS:
        return 0.0
    difference = box_depth(depth, box1, official_lookup) - box_depth(depth, box2, official_lookup)
    right_order = difference > 0 if relation == "in front of" else difference < 0
    iou = box_iou(box1, box2)
    if not right_order:
        return 0.0
    if iou > iou_threshold:
        return 1.0
    if 0 < iou < iou_threshold:
        return iou / iou_threshold
    return 0.0


def object_weighted_score(confidence1: float | None, confidence2: float | None, position: float,
                          floor: float = 0.0) -> float:
    """The detection-weighted spatial score (2D_spatial_eval.py, 3D_spatial_eval.py): both objects
    found: 0.25 * confidence1 + 0.25 * confidence2 + position / 2; one found: 0.25 * its
    confidence; none: 0. A score below ``floor`` becomes 0 (the 2D script's 0.5)."""
    if confidence1 is not None and confidence2 is not None:
        score = 0.25 * confidence1 + 0.25 * confidence2 + position / 2
    else:
        score = 0.25 * (confidence1 if confidence1 is not None else confidence2 or 0.0)
    return score if score >= floor else 0.0


def person_label(word: str) -> str:
    """girl / boy / man / woman are detected as "person" (the official mapping)."""
    return "person" if word.lower() in PERSON_WORDS else word


def spatial_objects(prompt: str, parser: Parser) -> tuple[str, str] | None:
    """The two objects of a simple spatial prompt: its first and last NOUN (2D_spatial_eval.py,
    3D_spatial_eval.py), person words mapped to "person"; None without a noun."""
    found = nouns(parser, prompt)
    return (person_label(found[0]), person_label(found[-1])) if found else None


def complex_spatial_objects(prompt: str, parser: Parser) -> tuple[str, str] | None:
    """The two objects of a complex prompt (2D_spatial_eval.py --complex): for every phrase of
    :data:`COMPLEX_PREPOSITIONS` (longest first), the nearest NOUN or PROPN before it and the first
    NOUN after it, or, when no NOUN follows, the first PROPN after it that a non-PROPN token follows
    (the official fall-back; only spaCy tags PROPN); exactly two found, else None."""
    tokens = parser.tokens(prompt)
    words = [t.text.lower() for t in tokens]
    objects = []
    for i in range(len(tokens)):
        length = next((k for k in (3, 2, 1) if " ".join(words[i:i + k]) in COMPLEX_PREPOSITIONS), None)
        if length is None:
            continue
        before = next((tokens[j].text for j in range(i - 1, -1, -1) if tokens[j].pos in ("NOUN", "PROPN")), None)
        after = next((tokens[j].text for j in range(i + length, len(tokens)) if tokens[j].pos == "NOUN"), None)
        if after is None:
            after = next((tokens[j].text for j in range(i + length, len(tokens) - 1)
                          if tokens[j].pos == "PROPN" and tokens[j + 1].pos != "PROPN"), None)
        objects += [word for word in (before, after) if word is not None]
    return (person_label(objects[0]), person_label(objects[1])) if len(objects) == 2 else None


def _best_by_label(detections: Sequence[Detection], name: str) -> Detection | None:
    """The most confident detection labelled ``name`` (the official ``obj.index(name)`` on UniDet's
    confidence-sorted output)."""
    matches = [d for d in detections if d.label.lower() == name.lower()]
    return max(matches, key=lambda d: d.score) if matches else None


def select_3d_objects(detections: Sequence[Detection], name1: str, name2: str
                      ) -> tuple[Detection | None, Detection | None]:
    """The detections of the two objects as 3D_spatial_eval.py picks them: labels containing the
    names as substrings; when both are present, the confidence-sorted detections are scanned until
    both are seen, each keeping its last match so far (so object 1 may get a less confident box);
    otherwise the most confident match of the one present."""
    ordered = sorted(detections, key=lambda d: -d.score)
    first = second = None
    if any(name1 in d.label.lower() for d in ordered) and any(name2 in d.label.lower() for d in ordered):
        for d in ordered:
            if name1 in d.label.lower():
                first = d
            if name2 in d.label.lower():
                second = d
            if first is not None and second is not None:
                break
        return first, second
    first = next((d for d in ordered if name1 in d.label.lower()), None)
    second = next((d for d in ordered if name2 in d.label.lower()), None) if first is None else None
    return first, second


def numeracy_targets(prompt: str, parser: Parser, objects: Mapping[str, str] = NUMERACY_OBJECTS
                     ) -> list[tuple[str, int]]:
    """(object, count) pairs of a numeracy prompt (UniDet_eval/numeracy_eval.py): each number word
    of :data:`NUMBER_COUNTS` followed by a known object (two words first, then one, singular or
    plural); a plural after a number other than a / an / one counts that number of the singular;
    anything else counts 1 (words lowercased). Malformed prompts the official code fails on
    ("two dog", "a mice") count as written."""
    words = [t.text.lower() for t in parser.tokens(prompt)]
    plurals = {plural: singular for singular, plural in reversed(list(objects.items()))}
    targets = []
    for i, word in enumerate(words):
        if word not in NUMBER_COUNTS or i + 1 >= len(words):
            continue
        candidates = ([(" ".join(words[i + 1:i + 3]), True)] if i + 2 < len(words) else []) + [(words[i + 1], False)]
        for name, two_words in candidates:
            if name not in objects and name not in plurals:
                continue
            counted_plural = name in plurals and word not in SINGULAR_WORDS
            if two_words:
                targets.append((plurals[name], NUMBER_COUNTS[word]) if counted_plural else (name, 1))
            elif name in objects and word in SINGULAR_WORDS:
                targets.append((name, 1))
            else:
                targets.append((plurals.get(name, name), NUMBER_COUNTS[word]))
            break
    return targets


def same_object(box_a: Sequence[float], box_b: Sequence[float]) -> bool:
    """Two boxes of one object (numeracy_eval.py calculate_iou): with inclusive pixel areas, IoU > 0.9
    or the overlap covering more than 90 % of either box."""
    inner = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]) + 1) * \
        max(0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]) + 1)
    area_a = (box_a[2] - box_a[0] + 1) * (box_a[3] - box_a[1] + 1)
    area_b = (box_b[2] - box_b[0] + 1) * (box_b[3] - box_b[1] + 1)
    return inner / (area_a + area_b - inner) > 0.9 or inner / area_a > 0.9 or inner / area_b > 0.9


def dedupe_detections(detections: Sequence[Detection]) -> list[Detection]:
    """Detections in confidence order, less those that repeat a kept one of the same label on the
    same object (numeracy_eval.py)."""
    kept: list[Detection] = []
    for d in sorted(detections, key=lambda d: -d.score):
        if not any(k.label.lower() == d.label.lower() and same_object(d.box, k.box) for k in kept):
            kept.append(d)
    return kept


def numeracy_score(targets: Sequence[tuple[str, int]], labels: Sequence[str]) -> float:
    """numeracy_eval.py: each target weighs 1 / len(targets), half of it for a detection of the
    object (renamed by :data:`NUMERACY_RENAMES`; a detected label containing the name is renamed to
    it) and half for exactly ``count`` such detections. 0 without targets."""
    if not targets:
        return 0.0
    labels = [label.lower() for label in labels]
    weight, score = 1.0 / len(targets), 0.0
    for name, count in targets:
        name = NUMERACY_RENAMES.get(name, name)
        if name not in labels:
            labels = [name if name in label else label for label in labels]
        if name in labels:
            score += 0.5 * weight
            if labels.count(name) == count:
                score += 0.5 * weight
    return score


def vqa_question(noun_phrase: str) -> str:
    """The BLIP question about a noun phrase: "{phrase}?" through BLIP's pre_question (lowercase,
    ``.!"()*#:;~`` removed, at most 50 words; BLIP_vqa.py, BLIPvqa_eval/data/utils.py)."""
    question = re.sub(r"[.!\"()*#:;~]", "", f"{noun_phrase}?".lower()).rstrip(" ")
    return " ".join(question.split(" ")[:50])


def blip_questions(prompt: str, parser: Parser, max_phrases: int = 8) -> list[str]:
    """The questions about the first ``max_phrases`` noun chunks of a prompt that are not
    :data:`EXCLUDED_CHUNKS` (BLIP_vqa.py)."""
    chunks = [chunk for chunk in parser.noun_chunks(prompt) if chunk not in EXCLUDED_CHUNKS]
    return [vqa_question(chunk) for chunk in chunks[:max_phrases]]


COMPLEX_KINDS = ("spatial", "action", "spatial_action")
_SPATIAL_PHRASE = r"(?:on top of|on the left of|on the right of|next to|near|on side of|on the bottom of|on the top of)"


def _normalise_complex(prompt: str) -> str:
    return prompt.split(".")[0].lower()  # 3_in_1.py compares the text before the first '.', lowercased


def complex_kind(prompt: str, split: tuple[Sequence[str], Sequence[str]] | None = None) -> str:
    """What a complex prompt composes: "spatial" (attribute + spatial), "action" (attribute +
    action) or "spatial_action" (all three). With ``split`` (the official spatial and action
    lists, :func:`read_complex_split`): membership as 3_in_1.py tests it, neither list being
    spatial_action. Without: a spatial phrase right after was / is / were / are is spatial, one
    elsewhere spatial_action, none action."""
    if split is not None:
        text = _normalise_complex(prompt)
        if text in {_normalise_complex(p) for p in split[0]}:
            return "spatial"
        if text in {_normalise_complex(p) for p in split[1]}:
            return "action"
        return "spatial_action"
    lowered = prompt.lower()
    if re.search(rf"\b(?:was|is|were|are) {_SPATIAL_PHRASE}\b", lowered):
        return "spatial"
    return "spatial_action" if re.search(rf"\b{_SPATIAL_PHRASE}\b", lowered) else "action"


def three_in_one(kind: str, attribute: float, spatial: float, action: float) -> float:
    """3_in_1_eval/3_in_1.py: spatial -> (spatial + attribute) / 2, action -> (action + attribute) / 2,
    spatial_action -> (attribute + spatial + action) / 3."""
    if kind == "spatial":
        return (spatial + attribute) / 2
    if kind == "action":
        return (action + attribute) / 2
    if kind == "spatial_action":
        return (attribute + spatial + action) / 3
    raise ValueError(f"unknown complex kind {kind!r}; known: {COMPLEX_KINDS}")


def detector_frame(width: int, height: int, short_side: int = 479, max_side: int = 480) -> tuple[int, int]:
    """(width, height) of an image resized as torchvision's Resize(size=short_side, max_size=max_side)
    does (UniDet's transform): boxes and depth maps are compared in that frame."""
    short, long = sorted((width, height))
    new_short, new_long = short_side, int(short_side * long / short)
    if new_long > max_side:
        new_short, new_long = int(max_side * new_short / new_long), max_side
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _scaled(detection: Detection, sx: float, sy: float) -> Detection:
    x1, y1, x2, y2 = detection.box
    return Detection(detection.label, float(detection.score), (x1 * sx, y1 * sy, x2 * sx, y2 * sy))


# --- models ------------------------------------------------------------------------------------------


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pooled(output: Any) -> torch.Tensor:
    """Projected CLIP features, from transformers >= 5 (an output object) or older (a tensor)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class BlipVqa:
    """BLIP VQA's P(yes) for (image, question) pairs, as BLIP_vqa.py's ``vqa_prob``: the question is
    encoded against the image with its first token set to [ENC] (BLIP's models/blip_vqa.py), the
    answer decoder is started with [DEC], and P(yes) = p("yes") / (p("yes") + p("no")) over the
    first decoded token, i.e. sigmoid(logit_yes - logit_no)."""

    def __init__(self, model: Any, processor: Any, image_size: int = 480, device: str | torch.device | None = None,
                 name: str = "BlipVqa"):
        self.name = name
        self.device = _device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.image_size = image_size
        tokenizer = processor.tokenizer
        self.yes_id, self.no_id = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
        if tokenizer.unk_token_id in (self.yes_id, self.no_id):
            raise ValueError("the BLIP tokenizer has no 'yes' / 'no' tokens")
        self.enc_id = self._enc_token_id(tokenizer, model.config.text_config)

    @staticmethod
    def _enc_token_id(tokenizer: Any, text_config: Any) -> int | None:
        """[ENC]: BLIP's init_tokenizer adds [DEC] then [ENC] after BERT's vocabulary, so it is the
        token after the decoder's start token when the tokenizer does not name it."""
        vocab = tokenizer.get_vocab()
        if "[ENC]" in vocab:
            return vocab["[ENC]"]
        return text_config.bos_token_id + 1 if text_config.bos_token_id + 1 < text_config.vocab_size else None

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_BLIP, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, image_size: int = 480) -> BlipVqa:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        hint = "Set the BLIP VQA model (default Salesforce/blip-vqa-base) to a local folder"
        model = from_pretrained_or_explain(BlipForQuestionAnswering, path, hint=hint, dtype=dtype, use_safetensors=True)
        return cls(model, from_pretrained_or_explain(BlipProcessor, path, hint=hint), image_size, device, path)

    @torch.no_grad()
    def p_yes(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]) -> list[list[float]]:
        """P(yes) of each question of ``questions[i]`` about ``images[i]``."""
        pairs = [(i, q) for i, qs in enumerate(questions) for q in qs]
        if not pairs:
            return [[] for _ in images]
        size = {"height": self.image_size, "width": self.image_size}
        pixels = self.processor.image_processor(list(images), size=size, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        interpolate = self.image_size != self.model.config.vision_config.image_size
        image_embeds = self.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=interpolate
                                               ).last_hidden_state  # (B, N, D)
        tokens = self.processor.tokenizer([q for _, q in pairs], padding="longest", truncation=True, max_length=35,
                                          return_tensors="pt").to(self.device)
        input_ids = tokens.input_ids.clone()
        if self.enc_id is not None:
            input_ids[:, 0] = self.enc_id
        pair_embeds = image_embeds[torch.tensor([i for i, _ in pairs], device=self.device)]  # (P, N, D)
        image_mask = torch.ones(pair_embeds.shape[:-1], dtype=torch.long, device=self.device)
        question_states = self.model.text_encoder(input_ids=input_ids, attention_mask=tokens.attention_mask,
                                                  encoder_hidden_states=pair_embeds,
                                                  encoder_attention_mask=image_mask).last_hidden_state
        start = torch.full((len(pairs), 1), self.model.decoder_start_token_id, device=self.device)
        logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=question_states,
                                         encoder_attention_mask=tokens.attention_mask).logits[:, 0, :].float()
        p_yes = torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]).tolist()
        out: list[list[float]] = [[] for _ in images]
        for (i, _), p in zip(pairs, p_yes):
            out[i].append(p)
        return out


class ClipSimilarity:
    """Cosine similarity of CLIP image and text embeddings (CLIP_similarity.py: normalised
    ``encode_image`` @ normalised ``encode_text``, no scale)."""

    def __init__(self, model: Any, processor: Any, device: str | torch.device | None = None,
                 name: str = "ClipSimilarity"):
        self.name = name
        self.device = _device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.max_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_CLIP, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> ClipSimilarity:
        from transformers import CLIPModel, CLIPProcessor

        hint = "Set the CLIP model (default openai/clip-vit-base-patch32) to a local folder"
        model = from_pretrained_or_explain(CLIPModel, path, hint=hint, dtype=dtype, use_safetensors=True)
        return cls(model, from_pretrained_or_explain(CLIPProcessor, path, hint=hint), device, path)

    @torch.no_grad()
    def similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """cos(image i, text i) for each i."""
        inputs = self.processor(text=list(texts), images=list(images), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(self.device)
        image = _pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.model.dtype)))
        text = _pooled(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                    attention_mask=inputs["attention_mask"]))
        image, text = image.float(), text.float()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(-1).tolist()


class DptDepth:
    """Relative inverse depth (larger = nearer) from DPT, min-max normalised per image to [0, 1]
    and resized bilinearly (align_corners) to a requested size (UniDet_eval/3D_spatial_eval.py)."""

    def __init__(self, model: Any, processor: Any, input_size: int = 480, device: str | torch.device | None = None,
                 name: str = "DptDepth"):
        self.name = name
        self.device = _device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.input_size = input_size

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_DEPTH, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, input_size: int = 480) -> DptDepth:
        from transformers import DPTForDepthEstimation, DPTImageProcessor

        hint = "Set the depth model (default Intel/dpt-large) to a local folder"
        model = from_pretrained_or_explain(DPTForDepthEstimation, path, hint=hint, dtype=dtype, use_safetensors=True)
        return cls(model, from_pretrained_or_explain(DPTImageProcessor, path, hint=hint), input_size, device, path)

    @torch.no_grad()
    def depth_maps(self, images: Sequence[Image.Image], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """One (height, width) = ``sizes[i]`` map in [0, 1] per image."""
        from transformers.image_utils import PILImageResampling

        size = {"height": self.input_size, "width": self.input_size}
        pixels = self.processor(list(images), size=size, keep_aspect_ratio=False, ensure_multiple_of=1,
                                resample=PILImageResampling.BILINEAR, return_tensors="pt")["pixel_values"]
        predicted = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).predicted_depth.float()
        maps = []
        for depth, (height, width) in zip(predicted, sizes):  # depth (h, w)
            span = depth.max() - depth.min()
            depth = (depth - depth.min()) / span if span > 0 else torch.zeros_like(depth)
            resized = torch.nn.functional.interpolate(depth[None, None], size=(height, width), mode="bilinear",
                                                      align_corners=True)
            maps.append(resized[0, 0].cpu().numpy())
        return maps


@dataclass
class CompBenchModels:
    """The models the scorers use, each an object or a path / hub id loaded on first use (so a
    category loads only what it needs)."""

    detector: Detector | None = None
    """Required by spatial, complex, numeracy and 3d_spatial (the CLI passes Mask2Former, OWLv2, ...)."""
    blip: BlipVqa | str = DEFAULT_BLIP
    clip: ClipSimilarity | str = DEFAULT_CLIP
    depth: DptDepth | str = DEFAULT_DEPTH
    device: str | torch.device | None = None
    """Where the BLIP / CLIP / DPT models run (default: cuda when available)."""
    dtype: torch.dtype = torch.float32
    blip_image_size: int = 480
    """BLIP input size (BLIPvqa_eval/configs/vqa.yaml image_size: 480; square, bicubic)."""
    depth_input_size: int = 480
    """DPT input size (UniDet_eval/experts/model_bank_3d.py: Resize([480, 480]), bilinear)."""

    def get_blip(self) -> BlipVqa:
        if isinstance(self.blip, str):
            self.blip = BlipVqa.from_pretrained(self.blip, self.device, self.dtype, self.blip_image_size)
        return self.blip

    def get_clip(self) -> ClipSimilarity:
        if isinstance(self.clip, str):
            self.clip = ClipSimilarity.from_pretrained(self.clip, self.device, self.dtype)
        return self.clip

    def get_depth(self) -> DptDepth:
        if isinstance(self.depth, str):
            self.depth = DptDepth.from_pretrained(self.depth, self.device, self.dtype, self.depth_input_size)
        return self.depth

    def get_detector(self, category: str) -> Detector:
        if self.detector is None:
            raise ValueError(f"T2I-CompBench category {category!r} needs a detector (a genalign Detector such as "
                             "Mask2Former or OWLv2); none was given")
        return self.detector

    def describe(self, categories: Sequence[str]) -> dict[str, str]:
        """Which model each used scorer ran (for the summary)."""
        def name(model: Any) -> str:
            return model if isinstance(model, str) else str(getattr(model, "name", type(model).__name__))

        used = set(categories)
        out = {}
        if used & {*ATTRIBUTE_CATEGORIES, "complex"}:
            out["blip_model"] = name(self.blip)
        if used & {"non_spatial", "complex"}:
            out["clip_model"] = name(self.clip)
        if "3d_spatial" in used:
            out["depth_model"] = name(self.depth)
        if used & set(DETECTOR_CATEGORIES):
            out["detector"] = name(self.detector)
            scale = getattr(self.detector, "scale", None)  # an optional attribute of a Detector
            if scale:
                out["detector_scale"] = scale
        return out


# --- scoring -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageScore:
    """One image's score of one scorer, with what explains it."""

    value: float
    reason: str
    details: dict[str, Any]


def _batches(entries: Sequence[ImageEntry], size: int, bar: Any) -> Iterator[tuple[list[ImageEntry], list[Image.Image]]]:
    for start in range(0, len(entries), size):
        batch = list(entries[start:start + size])
        yield batch, [load_image(e.path) for e in batch]
        if bar is not None:
            bar.update(len(batch))


def _by_prompt(entries: Sequence[ImageEntry], size: int) -> list[list[ImageEntry]]:
    """Batches of at most ``size`` images sharing a prompt (a detector call takes one label list)."""
    groups: dict[str, list[ImageEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.prompt, []).append(entry)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def score_attributes(entries: Sequence[ImageEntry], blip: BlipVqa, parser: Parser, options: CompBenchOptions,
                     bar: Any = None) -> list[ImageScore]:
    """BLIP-VQA attribute binding: product of P(yes) over the prompt's noun-chunk questions (1
    without any; BLIP_vqa.py)."""
    scores = []
    for batch, images in _batches(entries, options.batch_size, bar):
        questions = [blip_questions(e.prompt, parser, options.max_noun_phrases) for e in batch]
        for qs, ps in zip(questions, blip.p_yes(images, questions)):
            reason = ", ".join(f"{q} {p:.2f}" for q, p in zip(qs, ps)) or "no noun phrase (score 1)"
            scores.append(ImageScore(math.prod(ps), reason, {"questions": qs, "p_yes": ps}))
    return scores


def score_clip(entries: Sequence[ImageEntry], clip: ClipSimilarity, texts: Callable[[str], str],
               options: CompBenchOptions, bar: Any = None) -> list[ImageScore]:
    """CLIP cosine between each image and ``texts(prompt)`` (CLIP_similarity.py)."""
    scores = []
    for batch, images in _batches(entries, options.batch_size, bar):
        batch_texts = [texts(e.prompt) for e in batch]
        for text, similarity in zip(batch_texts, clip.similarity(images, batch_texts)):
            scores.append(ImageScore(similarity, f"CLIP cosine with {text!r}", {"text": text}))
    return scores


def _detect(detector: Detector, images: list[Image.Image], labels: list[str], options: CompBenchOptions
            ) -> list[tuple[list[Detection], tuple[int, int]]]:
    """Per image: its detections above the threshold with boxes in the detector frame, and that
    frame's (width, height)."""
    # a closed vocabulary is searched whole, so that the official matching applies to its names
    # (3D and numeracy take labels containing the prompt's word: "table" finds "dining table")
    out = []
    for image, found in zip(images, detector.detect(images, labels if detector.classes is None else None)):
        width, height = detector_frame(*image.size, options.detector_short_side, options.detector_max_side)
        sx, sy = width / image.size[0], height / image.size[1]
        kept = [_scaled(d, sx, sy) for d in found if d.score > options.detection_threshold]
        out.append((sorted(kept, key=lambda d: -d.score), (width, height)))
    return out


def _found(detection: Detection | None) -> list[float] | None:
    return None if detection is None else [round(float(detection.score), 5), *(round(v, 2) for v in detection.box)]


def score_spatial(entries: Sequence[ImageEntry], detector: Detector, parser: Parser, options: CompBenchOptions,
                  complex_prompts: bool = False, bar: Any = None) -> list[ImageScore]:
    """2D spatial: the prompt's two objects (first / last noun; the nouns around the spatial phrase
    for complex prompts), each one's most confident detection, :func:`position_score_2d` for the
    relation found in the prompt, :func:`object_weighted_score` with the 0.5 floor
    (2D_spatial_eval.py)."""
    by_index = {}
    for group in _by_prompt(entries, options.batch_size):
        prompt = group[0].prompt
        objects = complex_spatial_objects(prompt, parser) if complex_prompts else spatial_objects(prompt, parser)
        relation = find_relation(prompt, SPATIAL_RELATIONS)
        images = [load_image(e.path) for e in group]
        if objects is None:
            for entry in group:
                by_index[entry.index] = ImageScore(0.0, "the two objects were not found in the prompt",
                                               {"objects": None, "relation": relation})
        else:
            labels = list(dict.fromkeys(objects))
            for entry, (found, _) in zip(group, _detect(detector, images, labels, options)):
                first, second = (_best_by_label(found, name) for name in objects)
                position = position_score_2d(relation, first.box, second.box, options.iou_threshold,
                                             options.distance_threshold) if first and second else 0.0
                by_index[entry.index] = _two_object_score(objects, relation, first, second, position,
                                                          options.spatial_floor)
        if bar is not None:
            bar.update(len(group))
    return [by_index[e.index] for e in entries]


def _two_object_score(objects: Sequence[str], relation: str | None, first: Detection | None,
                      second: Detection | None, position: float, floor: float = 0.0) -> ImageScore:
    """The detection-weighted score of a two-object relation (2D and 3D alike), with why."""
    score = object_weighted_score(first.score if first else None, second.score if second else None, position, floor)
    reason = (f"{objects[0]}: {'missing' if first is None else f'{first.score:.2f}'}, "
              f"{objects[1]}: {'missing' if second is None else f'{second.score:.2f}'}, "
              f"{relation or 'no relation'}: {position:.2f}")
    return ImageScore(score, reason, {"objects": list(objects), "relation": relation, "position": position,
                                      "detections": [_found(first), _found(second)]})


def score_spatial_3d(entries: Sequence[ImageEntry], detector: Detector, depth_model: DptDepth, parser: Parser,
                     options: CompBenchOptions, bar: Any = None) -> list[ImageScore]:
    """3D spatial: the first / last nouns, their boxes as 3D_spatial_eval.py picks them
    (substring labels), :func:`position_score_3d` on DPT's depth in the detector frame,
    :func:`object_weighted_score` without a floor."""
    by_index = {}
    for group in _by_prompt(entries, options.batch_size):
        prompt = group[0].prompt
        objects = spatial_objects(prompt, parser)
        relation = find_relation(prompt, SPATIAL_3D_RELATIONS)
        images = [load_image(e.path) for e in group]
        if objects is None:
            for entry in group:
                by_index[entry.index] = ImageScore(0.0, "no noun in the prompt", {"objects": None, "relation": relation})
        else:
            names = [name.lower() for name in objects]
            detected = _detect(detector, images, list(dict.fromkeys(objects)), options)
            depths = depth_model.depth_maps(images, [(h, w) for _, (w, h) in detected])
            for entry, (found, _), depth in zip(group, detected, depths):
                first, second = select_3d_objects(found, *names)
                position = position_score_3d(relation, first.box, second.box, depth, options.iou_threshold_3d,
                                             options.official_depth_lookup) if first and second else 0.0
                by_index[entry.index] = _two_object_score(objects, relation, first, second, position)
        if bar is not None:
            bar.update(len(group))
    return [by_index[e.index] for e in entries]


def score_numeracy(entries: Sequence[ImageEntry], detector: Detector, parser: Parser, options: CompBenchOptions,
                   bar: Any = None) -> list[ImageScore]:
    """Numeracy: :func:`numeracy_targets` of the prompt, the detections de-duplicated
    (:func:`dedupe_detections`), :func:`numeracy_score` (numeracy_eval.py)."""
    by_index = {}
    for group in _by_prompt(entries, options.batch_size):
        targets = numeracy_targets(group[0].prompt, parser)
        if not targets:
            for entry in group:
                by_index[entry.index] = ImageScore(0.0, "no counted object in the prompt", {"targets": []})
        else:
            labels = list(dict.fromkeys(NUMERACY_RENAMES.get(name, name) for name, _ in targets))
            images = [load_image(e.path) for e in group]
            for entry, (found, _) in zip(group, _detect(detector, images, labels, options)):
                kept = [d.label.lower() for d in dedupe_detections(found)]
                score = numeracy_score(targets, kept)
                detected = ", ".join(f"{label} x{n}" for label, n in Counter(kept).items()) or "nothing"
                reason = f"wanted {', '.join(f'{name} x{count}' for name, count in targets)}; detected {detected}"
                by_index[entry.index] = ImageScore(score, reason, {"targets": [list(t) for t in targets], "labels": kept})
        if bar is not None:
            bar.update(len(group))
    return [by_index[e.index] for e in entries]


def vocabulary_coverage(category: str, prompts: Sequence[str], detector: Detector, parser: Parser
                        ) -> tuple[int, int]:
    """(prompts whose objects the detector can name, prompts with objects) of a detector category,
    under the category's official matching: the exact label for 2D spatial and complex, a label
    containing the word for 3D, numeracy's renamed word exactly or inside a label. An
    open-vocabulary detector (``classes`` None) covers every prompt."""
    vocabulary = None if detector.classes is None else [c.lower() for c in detector.classes]

    def exact(word: str) -> bool:
        return vocabulary is None or word.lower() in vocabulary

    def inside(word: str) -> bool:
        return vocabulary is None or any(word.lower() in label for label in vocabulary)

    covered = total = 0
    for prompt in dict.fromkeys(prompts):
        if category == "numeracy":
            targets = numeracy_targets(prompt, parser)
            names = [NUMERACY_RENAMES.get(name, name) for name, _ in targets]
            ok = bool(names) and all(exact(n) or inside(n) for n in names)
        else:
            objects = complex_spatial_objects(prompt, parser) if category == "complex" else spatial_objects(prompt, parser)
            names = list(objects) if objects else []
            ok = bool(names) and all((inside if category == "3d_spatial" else exact)(n) for n in names)
        total += bool(names)
        covered += ok
    return covered, total


def score_images(
    category: str,
    entries: Sequence[ImageEntry],
    models: CompBenchModels,
    options: CompBenchOptions = CompBenchOptions(),
    parser: Parser | None = None,
    complex_split: tuple[Sequence[str], Sequence[str]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Report records (task, prompt, image, score, reason, details) of one category's images."""
    check_category(category)
    parser = parser or load_parser()
    passes = 3 if category == "complex" else 1
    bar = _progress(passes * len(entries), f"t2i_compbench {category}", progress)
    try:
        if category in ATTRIBUTE_CATEGORIES:
            scores = score_attributes(entries, models.get_blip(), parser, options, bar)
        elif category == "non_spatial":
            scores = score_clip(entries, models.get_clip(), lambda prompt: prompt, options, bar)
        elif category == "spatial":
            scores = score_spatial(entries, models.get_detector(category), parser, options, bar=bar)
        elif category == "numeracy":
            scores = score_numeracy(entries, models.get_detector(category), parser, options, bar)
        elif category == "3d_spatial":
            scores = score_spatial_3d(entries, models.get_detector(category), models.get_depth(), parser, options,
                                      bar)
        else:
            detector = models.get_detector(category)
            attribute = score_attributes(entries, models.get_blip(), parser, options, bar)
            spatial = score_spatial(entries, detector, parser, options, complex_prompts=True, bar=bar)
            action = score_clip(entries, models.get_clip(), lambda p: without_adjectives(parser, p), options, bar)
            scores = []
            for entry, a, s, c in zip(entries, attribute, spatial, action):
                kind = complex_kind(entry.prompt, complex_split)
                value = three_in_one(kind, a.value, s.value, c.value)
                reason = f"{kind}: attribute {a.value:.2f}, spatial {s.value:.2f}, action {c.value:.2f}"
                scores.append(ImageScore(value, reason, {"kind": kind, "attribute": a.value, "spatial": s.value,
                                                     "action": c.value, "blip": a.details, "detection": s.details,
                                                     "clip_text": c.details["text"]}))
    finally:
        if bar is not None:
            bar.close()
    return [{"task": category, "prompt": e.prompt, "image": str(e.path), "score": float(s.value), "reason": s.reason,
             "details": {"index": e.index, **s.details}} for e, s in zip(entries, scores)]


def summarise(records: Sequence[Mapping[str, Any]], categories: Sequence[str] | None = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report summary: mean score per category (in :data:`CATEGORIES` order), their mean as
    ``overall``, the image count and ``extra`` (which models and parser ran)."""
    by_task: dict[str, list[float]] = {}
    for record in records:
        by_task.setdefault(str(record["task"]), []).append(float(record["score"]))
    order = list(categories) if categories is not None else [c for c in CATEGORIES if c in by_task]
    tasks = {task: float(np.mean(by_task[task])) for task in order if by_task.get(task)}
    return {"benchmark": BENCHMARK, "tasks": tasks,
            "overall": float(np.mean(list(tasks.values()))) if tasks else math.nan,
            "images": len(records), **(extra or {})}


def score_folder(
    root: str | Path,
    categories: Sequence[str] | str,
    models: CompBenchModels,
    options: CompBenchOptions = CompBenchOptions(),
    parser: Parser | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score ``categories`` of an image root (``<root>/<category>/[samples/]{prompt}_{NNNNNN}.png``):
    (report records, summary). ``data_dir`` holds the official prompt files; the complex kinds come
    from its complex_val_spatial / _action lists when present, else from the rule of
    :func:`complex_kind`."""
    categories = [categories] if isinstance(categories, str) else list(categories)
    for category in categories:
        check_category(category)
    if not categories:
        raise ValueError("no T2I-CompBench category to score")
    folders = {c: read_image_folder(image_folder(root, c), options.images_per_prompt) for c in categories}
    parser = parser or load_parser()
    split = read_complex_split(data_dir) if data_dir is not None and "complex" in categories else None
    records: list[dict[str, Any]] = []
    for category, entries in folders.items():
        records += score_images(category, entries, models, options, parser, split, progress)
    extra: dict[str, Any] = {"noun_phrases": parser.name, **models.describe(categories)}
    for category in categories:
        if category in DETECTOR_CATEGORIES and models.detector is not None:
            covered, total = vocabulary_coverage(category, [e.prompt for e in folders[category]], models.detector, parser)
            extra[f"vocabulary_{category}"] = (f"{covered} of {total} prompts' objects the detector can name"
                                               + (" (open vocabulary)" if models.detector.classes is None else ""))
    if "complex" in categories:
        extra["complex_kinds"] = "official lists" if split is not None else "rule (genalign complex_kind)"
    return records, summarise(records, categories, extra)
