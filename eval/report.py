"""Reports of a scoring run, the same for every benchmark: ``scores.json`` (summary, per-task
figures and one record per image), ``report.md`` (the table people paste) and ``report.html`` (an
image grid per task, each image marked pass / fail with its score and why, so a person can look),
and the side-by-side comparison of two runs (``genalign eval compare``).

A record is a dict with ``task``, ``prompt``, ``image`` (path), ``score`` (float) and optionally
``passed`` (bool, where the benchmark has a verdict), ``reason`` (str) and ``details`` (any JSON).
A summary is a dict with ``benchmark``, ``tasks`` ({task: score}), ``overall`` and any other
headline numbers (floats), which the markdown lists under the table.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCORES_FILE = "scores.json"
MAX_IMAGES_PER_TASK = 200  # the HTML page shows at most this many images of a task


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(summary: Mapping[str, Any]) -> str:
    """Task | score rows, then overall and the other headline numbers."""
    lines = [f"## {summary.get('benchmark', 'scores')}", "", "| task | score |", "|---|---|"]
    lines += [f"| {task} | {_fmt(value)} |" for task, value in summary.get("tasks", {}).items()]
    lines.append(f"| **overall** | **{_fmt(summary.get('overall', float('nan')))}** |")
    extra = {k: v for k, v in summary.items() if k not in ("benchmark", "tasks", "overall")}
    if extra:
        lines.append("")
        lines += [f"- {key}: {_fmt(value)}" for key, value in extra.items() if not isinstance(value, (dict, list))]
    return "\n".join(lines) + "\n"


def html_page(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], root: Path) -> str:
    """One section per task: its score, then a grid of its images, green frame = pass, red = fail
    (grey = no verdict), caption = score and prompt, tooltip = the reason."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(str(summary.get('benchmark', 'scores')))}</title>",
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;width:160px;"
        "vertical-align:top;font-size:11px}img{width:156px;border:4px solid #999;image-rendering:pixelated}"
        ".pass img{border-color:#2a2}.fail img{border-color:#d22}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
        f"<h1>{esc(str(summary.get('benchmark', 'scores')))}</h1>",
        "<table><tr><th>task</th><th>score</th></tr>",
    ]
    for task, value in summary.get("tasks", {}).items():
        parts.append(f"<tr><td><a href='#{esc(task)}'>{esc(task)}</a></td><td>{esc(_fmt(value))}</td></tr>")
    parts.append(f"<tr><th>overall</th><th>{esc(_fmt(summary.get('overall', '')))}</th></tr></table>")
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_task.setdefault(str(record["task"]), []).append(record)
    for task, rows in by_task.items():
        shown = rows[:MAX_IMAGES_PER_TASK]
        passed = sum(bool(r.get("passed")) for r in rows)
        parts.append(f"<h2 id='{esc(task)}'>{esc(task)}</h2><p>{len(rows)} images"
                     + (f", {passed} pass" if any("passed" in r for r in rows) else "")
                     + (f" (first {len(shown)} shown)" if len(shown) < len(rows) else "") + "</p>")
        for record in shown:
            verdict = record.get("passed")
            css = "pass" if verdict is True else "fail" if verdict is False else ""
            source = os.path.relpath(Path(record["image"]).resolve(), root.resolve())
            tip = esc(str(record.get("reason") or ""), quote=True)
            parts.append(
                f"<figure class='{css}' title='{tip}'><img src='{esc(source, quote=True)}' loading='lazy'>"
                f"<figcaption>{esc(_fmt(float(record['score'])))} · {esc(str(record['prompt']))}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: str | Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Path:
    """Write scores.json, report.md and report.html into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for record in records:
        missing = {"task", "prompt", "image", "score"} - set(record)
        if missing:
            raise ValueError(f"report record lacks {sorted(missing)}: {dict(record)}")
    payload = {"summary": dict(summary), "records": [dict(r, image=str(r["image"])) for r in records]}
    (out / SCORES_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    (out / "report.md").write_text(markdown_table(summary))
    (out / "report.html").write_text(html_page(summary, records, out))
    return out


def load_summary(run: str | Path) -> dict[str, Any]:
    """The summary of a run folder (or of its scores.json)."""
    path = Path(run)
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SCORES_FILE} at {path} (score the run first: genalign eval ... --score)")
    data = json.loads(path.read_text())
    if "summary" not in data:
        raise ValueError(f"{path} is not a genalign scores file (no 'summary')")
    return data["summary"]


def compare(run_a: str | Path, run_b: str | Path) -> str:
    """Markdown table of two runs' task scores side by side with B - A."""
    a, b = load_summary(run_a), load_summary(run_b)
    if a.get("benchmark") != b.get("benchmark"):
        raise ValueError(f"runs score different benchmarks: {a.get('benchmark')!r} vs {b.get('benchmark')!r}")
    tasks = list(dict.fromkeys([*a.get("tasks", {}), *b.get("tasks", {})]))
    lines = [f"## {a.get('benchmark', 'scores')}: A = {run_a}, B = {run_b}", "",
             "| task | A | B | B - A |", "|---|---|---|---|"]

    def row(name: str, va: Any, vb: Any) -> str:
        if isinstance(va, int) and isinstance(vb, int):
            diff = f"{vb - va:+d}"
        else:
            diff = f"{vb - va:+.4f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else ""
        return f"| {name} | {_fmt(va) if va is not None else '-'} | {_fmt(vb) if vb is not None else '-'} | {diff} |"

    lines += [row(t, a.get("tasks", {}).get(t), b.get("tasks", {}).get(t)) for t in tasks]
    lines.append(row("**overall**", a.get("overall"), b.get("overall")))
    for key in a:
        if key not in ("benchmark", "tasks", "overall") and isinstance(a[key], (int, float)) and key in b:
            lines.append(row(key, a[key], b[key]))
    return "\n".join(lines) + "\n"
