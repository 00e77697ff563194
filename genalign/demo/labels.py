"""Human preference labels for pairs written by ``genalign d3po sample``.

The pairs folder holds ``pairs.jsonl`` (one ``{"id", "prompt", "images": [first, second]}`` a
line) and the images. Labels go to a JSONL file, one decision a line::

    {"id": "000003", "preferred": 0, "choice": "left", "prompt": "...", "time": "2025-01-01T12:00:00Z"}

``preferred`` is D3PO's label (0: the first image is better, 1: the second, "tie"), so
``method.labels=<labels.jsonl>`` trains on the file as it is. A decision is appended and fsynced
before the page moves on, so a recorded label survives a crash or a killed server; relabelling a
pair appends another line and the latest line wins. A line torn by a crash mid-write is skipped
when reading and closed off with a newline before the next append, so it never swallows a label.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# the page's buttons -> D3PO's label (0: the first image is better)
CHOICES: dict[str, int | str] = {"left": 0, "right": 1, "tie": "tie"}
CHOICE_NAMES = {0: "left", 1: "right", "tie": "tie"}


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str
    images: tuple[Path, Path]  # first (left), second (right)


def read_pairs(pairs_dir: str | Path) -> list[Pair]:
    """The pairs of a ``genalign d3po sample`` folder, in file order; image files must lie inside it."""
    root = Path(pairs_dir).resolve()
    index = root / "pairs.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{pairs_dir} has no pairs.jsonl (write it with `genalign d3po sample`)")
    pairs, seen = [], set()
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pair_id, prompt, files = str(row["id"]), str(row["prompt"]), row["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}:{number}: not a pair line ({err})") from err
        if len(files) != 2:
            raise ValueError(f"{index}:{number}: a pair has two images, got {len(files)}")
        images = tuple((root / f).resolve() for f in files)
        for image in images:
            if not image.is_relative_to(root):
                raise ValueError(f"{index}:{number}: image {image} lies outside the pairs folder")
        if pair_id in seen:
            raise ValueError(f"{index}:{number}: pair id {pair_id} appears twice")
        seen.add(pair_id)
        pairs.append(Pair(pair_id, prompt, (images[0], images[1])))
    return pairs


def read_label_lines(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """All label records of a JSONL file in order, and how many lines were unreadable (torn)."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "id" not in record or record.get("preferred") not in CHOICE_NAMES:
                raise ValueError(line)
        except ValueError:
            bad += 1
            continue
        records.append(record)
    return records, bad


def latest_labels(records: list[dict[str, Any]]) -> dict[str, int | str]:
    """pair id -> its latest label (later lines win)."""
    return {str(r["id"]): r["preferred"] for r in records}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LabelStore:
    """An append-only labels file; safe to share between the page's sessions (one lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        records, self.unreadable_lines = read_label_lines(self.path)
        self.labels = latest_labels(records)
        self.history: dict[str, list[int | str]] = {}
        for record in records:
            self.history.setdefault(str(record["id"]), []).append(record["preferred"])

    def record(self, pair: Pair, choice: str, **extra: Any) -> dict[str, Any]:
        """Append the decision ``choice`` (left, right, tie) for ``pair``; returns the line written.
        Returns only after the line is on disk (fsync)."""
        if choice not in CHOICES:
            raise ValueError(f"a label is one of {', '.join(CHOICES)}, got {choice!r}")
        record = {"id": pair.id, "preferred": CHOICES[choice], "choice": choice, "prompt": pair.prompt,
                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"), **extra}
        data = (json.dumps(record) + "\n").encode()
        with self._lock:
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if not created and not self._ends_with_newline():
                    data = b"\n" + data  # close off a torn last line instead of merging into it
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.path.parent)  # the new file's directory entry is durable too
            self.labels[pair.id] = record["preferred"]
            self.history.setdefault(pair.id, []).append(record["preferred"])
        return record

    def _ends_with_newline(self) -> bool:
        size = self.path.stat().st_size
        if size == 0:
            return True
        with open(self.path, "rb") as file:
            file.seek(size - 1)
            return file.read(1) == b"\n"

    def choice(self, pair_id: str) -> str | None:
        """The latest choice (left, right, tie) for a pair, None if unlabelled."""
        label = self.labels.get(pair_id)
        return None if label is None else CHOICE_NAMES[label]

    def first_unlabelled(self, pairs: list[Pair], start: int = 0) -> int | None:
        """Index of the first pair at or after ``start`` without a label, then from the beginning."""
        order = list(range(start, len(pairs))) + list(range(0, min(start, len(pairs))))
        return next((i for i in order if pairs[i].id not in self.labels), None)

    def export_json(self, destination: str | Path, pair_ids: list[str] | None = None) -> Path:
        """Write ``{id: 0 | 1 | "tie"}`` (the latest label of each pair) atomically: the format
        ``method.labels=labels.json`` reads. ``pair_ids``: keep only these pairs."""
        destination = Path(destination)
        with self._lock:
            labels = {k: v for k, v in sorted(self.labels.items()) if pair_ids is None or k in pair_ids}
        partial = destination.with_name(destination.name + ".partial")
        with open(partial, "w") as file:
            file.write(json.dumps(labels, indent=1) + "\n")
            file.flush()
            os.fsync(file.fileno())
        partial.replace(destination)
        _fsync_dir(destination.parent)
        return destination
