"""A labelled set of generated shapes images, and the exact evaluator's agreement with it.

The set lives in ``models/shapes/labelled/``: ``images/NNNN.png`` (32x32 RGB as generated),
``items.jsonl`` (per image: id, the model that drew it, the prompt's GenEval metadata, the seed)
and ``labels.jsonl`` (per image: the objects a person saw and whether the image shows the prompt).
A person labels from contact sheets (:func:`contact_sheet`: each image enlarged, with its id and
prompt, nothing of the evaluator's) by writing one line per image in the compact form
:func:`parse_label_line` reads::

    0012 | red circle, blue square | yes
    0013 | ? triangle, green ? | no        (? = unclear shape or colour)
    0014 | - | no                           (no object)
    0015 | red circle, blue square | ?       (cannot tell whether it shows the prompt)

:func:`agreement` compares the evaluator with the labels per task: objects found (same number),
shapes and colours (the same multiset; an unclear label matches anything) and verdicts.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genalign.shapes.world import COLORS, SHAPES, TASKS

UNCLEAR = "?"
VERDICTS = {"yes": True, "no": False, UNCLEAR: None}


@dataclass(frozen=True)
class Label:
    """What a person saw in one image: objects as (shape, colour), either possibly UNCLEAR, and
    whether the image shows its prompt (None: the person could not tell)."""

    id: int
    objects: tuple[tuple[str, str], ...]
    correct: bool | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "objects": [{"shape": s, "color": c} for s, c in self.objects],
                "correct": self.correct}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Label:
        return cls(int(row["id"]), tuple((o["shape"], o["color"]) for o in row["objects"]), row["correct"])


def parse_label_line(line: str) -> Label:
    """``"0012 | red circle, ? square | yes"`` -> Label; errors name what is wrong."""
    fields = [f.strip() for f in line.split("|")]
    if len(fields) != 3:
        raise ValueError(f"a label line is 'ID | objects | yes/no', got {line!r}")
    ident, objects_text, verdict = fields
    if not ident.isdigit():
        raise ValueError(f"the id must be a number, got {ident!r} in {line!r}")
    if verdict not in VERDICTS:
        raise ValueError(f"the verdict must be yes, no or ?, got {verdict!r} in {line!r}")
    objects: list[tuple[str, str]] = []
    if objects_text not in ("-", ""):
        for item in objects_text.split(","):
            words = item.split()
            if len(words) != 2:
                raise ValueError(f"an object is 'colour shape', got {item.strip()!r} in {line!r}")
            color, shape = words
            if color not in (*COLORS, UNCLEAR) or shape not in (*SHAPES, UNCLEAR):
                raise ValueError(f"unknown colour or shape in {item.strip()!r} ({line!r}); colours: "
                                 f"{', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; ? for unclear")
            objects.append((shape, color))
    return Label(int(ident), tuple(objects), VERDICTS[verdict])


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_labels(path: str | Path) -> dict[int, Label]:
    """``labels.jsonl`` by image id."""
    return {label.id: label for label in map(Label.from_json, read_jsonl(path))}


def _multiset_matches(found: Sequence[str], labelled: Sequence[str]) -> bool:
    """The evaluator's values equal the labelled ones as multisets, an UNCLEAR label matching any
    one value."""
    if len(found) != len(labelled):
        return False
    missing = Counter(found)
    missing.subtract(Counter(v for v in labelled if v != UNCLEAR))
    return all(n >= 0 for n in missing.values())


def compare(detected: Sequence[tuple[str, str]], correct: bool, label: Label) -> dict[str, bool | None]:
    """One image: the evaluator's objects (shape, colour) and verdict against a person's label
    (``verdicts`` is None where the person could not tell)."""
    return {
        "objects": len(detected) == len(label.objects),
        "shapes": _multiset_matches([s for s, _ in detected], [s for s, _ in label.objects]),
        "colours": _multiset_matches([c for _, c in detected], [c for _, c in label.objects]),
        "verdicts": None if label.correct is None else correct == label.correct,
    }


def agreement(
    items: Sequence[dict[str, Any]],
    labels: dict[int, Label],
    images: Callable[[int], Any],
    parse: Callable[[Any], list[Any]],
    judge: Callable[[Any, dict[str, Any], list[Any]], tuple[bool, str]],
) -> dict[str, dict[str, float]]:
    """Per task and ``all``: the share of labelled images on which the evaluator agrees with the
    person (objects found, shapes, colours, verdicts), plus ``n`` (images) and ``n_verdicts``
    (images whose verdict the person could tell; the verdict share is over those). ``parse(image)`` gives the
    evaluator's detections (with ``shape`` and ``color``), ``judge(image, meta, detections)`` its
    (correct, reason)."""
    rows: dict[str, list[dict[str, bool | None]]] = {}
    for item in items:
        if item["id"] not in labels:
            continue
        image = images(item["id"])
        found = parse(image)
        correct, _ = judge(image, item["meta"], found)
        result = compare([(d.shape, d.color) for d in found], correct, labels[item["id"]])
        rows.setdefault(item["meta"]["tag"], []).append(result)
        rows.setdefault("all", []).append(result)
    table = {}
    for task in (*TASKS, "all"):
        if task in rows:
            table[task] = {key: float(np.mean([r[key] for r in rows[task] if r[key] is not None] or [np.nan]))
                           for key in rows[task][0]}
            table[task]["n"] = float(len(rows[task]))
            table[task]["n_verdicts"] = float(sum(r["verdicts"] is not None for r in rows[task]))
    return table


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], path: str | Path, scale: int = 8,
                  columns: int = 6) -> Path:
    """A PNG of the images enlarged ``scale`` times (nearest neighbour), each above its caption."""
    from PIL import Image, ImageDraw

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    size = images[0].shape[0] * scale
    caption_height = 30
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (size + 8), rows * (size + caption_height + 8)), (60, 60, 60))
    draw = ImageDraw.Draw(sheet)
    for index, (image, caption) in enumerate(zip(images, captions)):
        x, y = (index % columns) * (size + 8) + 4, (index // columns) * (size + caption_height + 8) + 4
        pixels = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        sheet.paste(pixels.resize((size, size), Image.NEAREST), (x, y))
        for line, text in enumerate(textwrap.wrap(caption, size // 6)[:2]):
            draw.text((x, y + size + 2 + 12 * line), text, fill=(255, 255, 255))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return Path(path)


# --------------------------------------------------------------------------- building and labelling


@dataclass(frozen=True)
class Source:
    """A model whose images go into the set: ``name``, backbone family and folder, optional LoRA."""

    name: str
    family: str
    path: str
    lora: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Source:
        """``NAME=FAMILY:PATH[:LORA]``, e.g. ``sd-dpo=sd:models/shapes/sd:runs/dpo/final/lora.safetensors``."""
        name, _, rest = spec.partition("=")
        family, _, location = rest.partition(":")
        path, _, lora = location.partition(":")
        if not (name and family and path):
            raise ValueError(f"a model is NAME=FAMILY:PATH[:LORA], got {spec!r}")
        return cls(name, family, path, lora or None)

    def load(self) -> Any:
        """The backbone on the CPU, with the LoRA loaded when there is one."""
        import torch

        from genalign.core.experiment import BackboneConfig
        from genalign.pipelines import load_backbone

        backbone = load_backbone(BackboneConfig(family=self.family, path=self.path, finetune="none"),
                                 torch.device("cpu"))
        if self.lora:
            backbone.load_lora(self.lora)
        return backbone


def build_set(sources: Sequence[Source], out: str | Path, per_task: int, seed: int, steps: int = 25,
              guidance_scale: float = 2.0, split: str = "heldout") -> list[dict[str, Any]]:
    """Generate ``per_task`` images a task from each source (held-out prompts, ``genalign eval
    shapes`` settings) into ``out/images/NNNN.png`` and append their rows to ``out/items.jsonl``;
    ids continue after those already there."""
    from genalign.core.images import to_pil_images
    from genalign.shapes.scoring import generate
    from genalign.shapes.world import evaluation_set

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = read_jsonl(out / "items.jsonl") if (out / "items.jsonl").exists() else []
    next_id = max((item["id"] for item in items), default=-1) + 1
    for source in sources:
        metas = evaluation_set(split, per_task=per_task, seed=seed)
        images = generate(source.load(), [m["prompt"] for m in metas], steps, guidance_scale, seed)
        for index, (image, meta) in enumerate(zip(to_pil_images(images), metas)):
            image.save(out / "images" / f"{next_id:04d}.png")
            items.append({"id": next_id, "source": source.name, "family": source.family, "seed": seed,
                          "index": index, "meta": meta})
            next_id += 1
    write_jsonl(out / "items.jsonl", items)
    return items


def load_image(folder: str | Path, ident: int) -> np.ndarray:
    """Image ``ident`` of a labelled set as (H, W, 3) float32 in [0, 1]."""
    from PIL import Image

    return np.asarray(Image.open(Path(folder) / "images" / f"{ident:04d}.png").convert("RGB"), np.float32) / 255.0


def _labels_so_far(folder: Path) -> dict[int, Label]:
    return read_labels(folder / "labels.jsonl") if (folder / "labels.jsonl").exists() else {}


def write_sheets(folder: str | Path, out: str | Path, per_sheet: int = 30, order_seed: int = 0) -> list[Path]:
    """Contact sheets of the images of a set not yet labelled, in an order shuffled by ``order_seed``
    (so that a sheet mixes models and tasks), each captioned with its id and prompt."""
    labelled = _labels_so_far(Path(folder))
    items = [item for item in read_jsonl(Path(folder) / "items.jsonl") if item["id"] not in labelled]
    order = np.random.default_rng(order_seed).permutation(len(items))
    sheets = []
    for start in range(0, len(items), per_sheet):
        chosen = [items[i] for i in order[start : start + per_sheet]]
        sheets.append(contact_sheet([load_image(folder, item["id"]) for item in chosen],
                                    [f"{item['id']:04d} {item['meta']['prompt'][len('a photo of '):]}" for item in chosen],
                                    Path(out) / f"sheet-{start // per_sheet:02d}.png"))
    return sheets


def import_labels(folder: str | Path, lines: Sequence[str]) -> dict[int, Label]:
    """Parse compact label lines and merge them into ``folder/labels.jsonl`` (a later line for an
    id replaces an earlier one); ids must exist in the set."""
    folder = Path(folder)
    known = {item["id"] for item in read_jsonl(folder / "items.jsonl")}
    labels = _labels_so_far(folder)
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        label = parse_label_line(line)
        if label.id not in known:
            raise ValueError(f"no image {label.id:04d} in {folder}")
        labels[label.id] = label
    write_jsonl(folder / "labels.jsonl", [labels[i].to_json() for i in sorted(labels)])
    return labels


def evaluator_agreement(folder: str | Path) -> dict[str, dict[str, float]]:
    """:func:`agreement` of the shapes evaluator with the labelled set in ``folder``."""
    from genalign.shapes.evaluator import detect, evaluate

    folder = Path(folder)
    return agreement(read_jsonl(folder / "items.jsonl"), read_labels(folder / "labels.jsonl"),
                     lambda ident: load_image(folder, ident), detect, evaluate)


def agreement_table(table: dict[str, dict[str, float]]) -> str:
    """The agreement as a markdown table, one row per task."""
    lines = ["| task | images | objects found | shapes | colours | verdicts (of n) |", "|---|---|---|---|---|---|"]
    for task, row in table.items():
        lines.append(f"| {task} | {int(row['n'])} | {row['objects']:.3f} | {row['shapes']:.3f} | "
                     f"{row['colours']:.3f} | {row['verdicts']:.3f} ({int(row['n_verdicts'])}) |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m genalign.shapes.labelling build | sheets | import | agreement``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m genalign.shapes.labelling", description=__doc__.split("\n")[0])
    parser.add_argument("--set", default="models/shapes/labelled", help="the labelled set's folder")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="generate images from models into the set")
    build.add_argument("--source", action="append", required=True, metavar="NAME=FAMILY:PATH[:LORA]")
    build.add_argument("--per-task", type=int, default=13)
    build.add_argument("--seed", type=int, default=7)
    sheets = commands.add_parser("sheets", help="write contact sheets to label from")
    sheets.add_argument("--out", default="runs/label-sheets")
    labels = commands.add_parser("import", help="add compact label lines (a file, or - for stdin)")
    labels.add_argument("file")
    commands.add_parser("agreement", help="the evaluator's agreement with the labels, per task")
    args = parser.parse_args(argv)
    if args.command == "build":
        items = build_set([Source.parse(spec) for spec in args.source], args.set, args.per_task, args.seed)
        print(f"{len(items)} images in {args.set}")
    elif args.command == "sheets":
        for sheet in write_sheets(args.set, args.out):
            print(sheet)
    elif args.command == "import":
        import sys

        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        print(f"{len(import_labels(args.set, text.splitlines()))} labelled images in {args.set}")
    else:
        print(agreement_table(evaluator_agreement(args.set)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
