"""The Gradio page: Compare (variants side by side, one seed per column), Gallery (a whole prompt
list) and Label pairs (D3PO preferences). gradio is imported here only, inside functions.

Every callback catches its exceptions and shows them in the page (an error box and a toast); the
server keeps running. Paths typed in the page must resolve inside the configured folders.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genalign.demo.config import BASE, DemoConfig, PathNotAllowed, parse_prompts, parse_seeds
from genalign.demo.grid import assemble_grid, enlarge, to_image
from genalign.demo.labels import LabelStore, Pair, read_pairs

log = logging.getLogger("genalign.demo")
INSTALL_HINT = "the demo needs gradio: pip install 'genalign[demo]' (or pip install 'gradio>=5')"
MAX_PROMPTS = 500
# small generated images (the shapes world's 32 px) are scaled up by the browser: keep pixels sharp
PAGE_CSS = """
.pixelated img { image-rendering: pixelated; }
.error-box { border-left: 4px solid #d33; padding-left: 0.6em; }
"""


class DemoUnavailable(RuntimeError):
    """gradio is not installed."""


def import_gradio() -> Any:
    """gradio, with its telemetry and version check off (the variables are read at use)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError as err:
        raise DemoUnavailable(INSTALL_HINT) from err
    return gr


def _message(err: BaseException) -> str:
    from genalign.core.config import ConfigError

    if isinstance(err, PathNotAllowed | ConfigError | FileNotFoundError | ValueError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _error_box(text: str) -> str:
    return f"**Error:** {html.escape(text)}"


def shows_errors(num_outputs: int, error_slot: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a callback: an exception becomes a message in output ``error_slot`` (and a toast);
    every other output is left as it was."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            gr = import_gradio()
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                log.exception("demo callback %s failed", fn.__name__)
                text = _message(err)
                gr.Warning(text)
                outputs = [gr.update() for _ in range(num_outputs)]
                outputs[error_slot] = gr.update(value=_error_box(text), visible=True)
                return tuple(outputs) if num_outputs > 1 else outputs[0]

        return inner

    return wrap


# --------------------------------------------------------------------------- presenting a comparison


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell_text(cell: Any) -> str:
    parts = [f"{name} {_fmt(v)}" for name, v in cell.scores.items()]
    if cell.verdict is not None:
        correct, reason = cell.verdict
        wrong = f"gold ✗ wrong ({reason[:60]})" if reason else "gold ✗ wrong"
        parts.append("gold ✓ correct" if correct else wrong)
    return " · ".join(parts) or "-"


def _md(text: str) -> str:
    return html.escape(text).replace("|", "\\|")


def comparison_markdown(comparison: Any, layout: str) -> str:
    """The scores as Markdown: per row and column (compare) or per variant means (gallery)."""
    summary = comparison.summary()
    lines = [f"**Backbone** {_md(comparison.backbone)} · prompts {len(comparison.prompts)} · "
             f"seeds {', '.join(map(str, comparison.seeds))}"]
    if layout == "compare":
        if len(comparison.prompts) > 1:
            lines += ["", *(f"- p{i + 1}: {_md(p)}" for i, p in enumerate(comparison.prompts))]
        else:
            lines += ["", f"**Prompt:** {_md(comparison.prompts[0])}"]
        columns = [(i, s) for i in range(len(comparison.prompts)) for s in comparison.seeds]
        head = [f"p{i + 1} seed {s}" if len(comparison.prompts) > 1 else f"seed {s}" for i, s in columns]
        lines += ["", "| variant | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for row in comparison.rows:
            cells = [_cell_text(comparison.cell(row, i, s)) for i, s in columns]
            lines.append(f"| {_md(row)} | " + " | ".join(_md(c) for c in cells) + " |")
    names = [*comparison.rewards, "gold"]
    lines += ["", "| variant | " + " | ".join(f"mean {n}" if n != "gold" else "gold accuracy" for n in names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for row in comparison.rows:
        lines.append(f"| {_md(row)} | " + " | ".join(_fmt(summary[row][n]) for n in names) + " |")
    if all(summary[row]["gold"] is None for row in comparison.rows):
        lines.append("\n(gold verdicts only for prompts of the shapes world)")
    return "\n".join(lines)


def layout_cells(comparison: Any, layout: str) -> tuple[list[list[Any]], list[str], list[str], int]:
    """(grid of cells, row labels, column labels, columns): compare puts variants in rows and
    (prompt, seed) in columns; gallery puts prompts in rows and (variant, seed) in columns."""
    if layout == "compare":
        columns = [(i, s) for i in range(len(comparison.prompts)) for s in comparison.seeds]
        col_labels = [f"seed {s}" if len(comparison.prompts) == 1 else f"p{i + 1} {comparison.prompts[i]} · seed {s}"
                      for i, s in columns]
        grid = [[comparison.cell(row, i, s) for i, s in columns] for row in comparison.rows]
        return grid, list(comparison.rows), col_labels, len(columns)
    columns_v = [(row, s) for row in comparison.rows for s in comparison.seeds]
    col_labels = [row if len(comparison.seeds) == 1 else f"{row} · seed {s}" for row, s in columns_v]
    grid = [[comparison.cell(row, i, s) for row, s in columns_v] for i in range(len(comparison.prompts))]
    return grid, list(comparison.prompts), col_labels, len(columns_v)


def comparison_grid(comparison: Any, layout: str) -> Any:
    """The labelled grid (PIL): row and column labels, each cell's scores and verdict under it."""
    grid, row_labels, col_labels, _ = layout_cells(comparison, layout)
    return assemble_grid([[c.image for c in row] for row in grid], row_labels, col_labels,
                         [[c.caption(plain=True) for c in row] for row in grid])


def write_download(comparison: Any, grid_image: Any, layout: str, out_dir: Path) -> list[str]:
    """grid.png and scores.json in a fresh folder under ``out_dir``."""
    folder = out_dir / f"{layout}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True, exist_ok=True)
    grid_image.save(folder / "grid.png")
    (folder / "scores.json").write_text(json.dumps(comparison.to_json(), indent=1) + "\n")
    return [str(folder / "grid.png"), str(folder / "scores.json")]


# --------------------------------------------------------------------------- labelling


class Labelling:
    """Pairs folders and their label stores, shared by all sessions (one store per labels file)."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self._stores: dict[Path, LabelStore] = {}
        self._pairs: dict[Path, tuple[float, list[Pair]]] = {}
        self._lock = threading.Lock()

    def labels_path(self, pairs_dir: Path) -> Path:
        configured = self.config.pairs_dir
        if configured and Path(configured).resolve() == pairs_dir and self.config.labels_path is not None:
            return self.config.labels_path.resolve()
        return pairs_dir / "labels.jsonl"

    def open(self, pairs_dir: Path) -> tuple[list[Pair], LabelStore]:
        index = pairs_dir / "pairs.jsonl"
        with self._lock:
            mtime = index.stat().st_mtime if index.is_file() else -1.0
            cached = self._pairs.get(pairs_dir)
            if cached is None or cached[0] != mtime:  # `genalign d3po sample` may append more pairs
                self._pairs[pairs_dir] = (mtime, read_pairs(pairs_dir))
            path = self.labels_path(pairs_dir)
            if path not in self._stores:
                self._stores[path] = LabelStore(path)
            return self._pairs[pairs_dir][1], self._stores[path]


def _pair_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return enlarge(image.convert("RGB"), 256)


# --------------------------------------------------------------------------- the page


def _differentiable(reward_name: str) -> bool:
    """Whether a registered reward passes gradients to the pixels (what ReNO needs)."""
    from genalign.rewards import REWARDS

    return reward_name in REWARDS and bool(getattr(REWARDS.get(reward_name), "differentiable", False))


def build_app(config: DemoConfig, bank: Any = None) -> Any:
    """The demo's ``gr.Blocks`` (launch it with :func:`launch`). ``bank``: a ModelBank to share."""
    gr = import_gradio()
    from genalign.demo.models import ModelBank, Row, Settings

    bank = bank or ModelBank(config)
    roots = config.roots()
    out_dir = Path(config.out_dir)
    labelling = Labelling(config)
    variant_names = [BASE, *bank.variants]
    reward_names = list(bank.rewards)
    reno_default = next((name for name in reward_names if _differentiable(name)), None)
    backbone_names = list(bank.backbones)
    default_prompts = ""
    if config.prompt_file and Path(config.prompt_file).is_file():
        default_prompts = Path(config.prompt_file).read_text()

    def settings_from(steps: float, guidance: float, reno_reward: str | None, reno_steps: float,
                      reno_iterations: float, reno_lr: float) -> Any:
        return Settings(steps=int(steps), guidance_scale=float(guidance), reno_reward=reno_reward or None,
                        reno_steps=int(reno_steps), reno_iterations=int(reno_iterations), reno_lr=float(reno_lr))

    def run_layout(layout: str, backbone: str, prompts: list[str], seeds: list[int], variants: list[str],
                   reno_on: list[str], rewards: list[str], settings: Any, progress: Any) -> tuple[Any, ...]:
        rows = [Row(v) for v in variants] + [Row(v, reno=True) for v in reno_on]
        comparison = bank.compare(backbone, rows, prompts, seeds, rewards or [], settings,
                                  progress=lambda fraction, desc: progress(fraction, desc=desc))
        grid, _, _, columns = layout_cells(comparison, layout)
        items = []
        for row in grid:
            for cell in row:
                caption = f"{cell.row} · seed {cell.seed}" + (f" · {cell.caption()}" if cell.caption() else "")
                if layout == "gallery":
                    caption = f"{cell.prompt} · {caption}"
                items.append((enlarge(to_image(cell.image)), caption))
        grid_image = comparison_grid(comparison, layout)
        files = write_download(comparison, grid_image, layout, out_dir)
        notes = "\n".join(f"- {_md(e)}" for e in comparison.errors)
        error = gr.update(value=f"**Some scores are missing:**\n{notes}" if notes else "", visible=bool(notes))
        # whole rows of the grid per gallery row (so a gallery column keeps one seed), about 4 images wide
        gallery_columns = columns * max(1, math.ceil(4 / columns))
        return (error, grid_image, gr.update(value=items, columns=gallery_columns),
                comparison_markdown(comparison, layout), files, comparison.to_json())

    with gr.Blocks(title="genalign demo", analytics_enabled=False) as app:
        gr.Markdown("# genalign demo\nCompare fine-tuned variants of a backbone on the same seeds, score them "
                    "with reward models (and, for shapes-world prompts, the exact evaluator), label preference pairs.")
        with gr.Row():
            backbone = gr.Dropdown(backbone_names, value=backbone_names[0], label="Backbone", elem_id="backbone")
            steps = gr.Number(config.steps, label="Steps", precision=0, minimum=1, maximum=1000, elem_id="steps")
            guidance = gr.Number(config.guidance_scale, label="Guidance scale", minimum=0, maximum=50,
                                 elem_id="guidance")
        with gr.Accordion("ReNO (noise optimisation on top of a variant)", open=False):
            with gr.Row():
                reno_reward = gr.Dropdown(reward_names, value=reno_default, label="ReNO reward",
                                          info="a differentiable reward", elem_id="reno-reward")
                reno_steps = gr.Number(config.reno_steps, label="ReNO generator steps", precision=0, minimum=1,
                                       maximum=50)
                reno_iterations = gr.Number(config.reno_iterations, label="ReNO iterations", precision=0,
                                            minimum=1, maximum=200)
                reno_lr = gr.Number(config.reno_lr, label="ReNO learning rate", minimum=0)
        sampling = [steps, guidance, reno_reward, reno_steps, reno_iterations, reno_lr]

        with gr.Tabs():
            # ------------------------------------------------------------ compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    prompts = gr.Textbox(label="Prompts (one a line)", lines=2, elem_id="compare-prompts",
                                         value="a photo of two circles" if not default_prompts
                                         else default_prompts.splitlines()[0])
                    seeds = gr.Textbox("0, 1", label="Seeds (one column each: the same noise for every variant)",
                                       elem_id="compare-seeds")
                with gr.Row():
                    variants = gr.CheckboxGroup(variant_names, value=variant_names, label="Variants (rows)",
                                                elem_id="compare-variants")
                    reno_rows = gr.CheckboxGroup(variant_names, value=[], label="ReNO on top of (extra rows)",
                                                 elem_id="compare-reno")
                    rewards = gr.CheckboxGroup(reward_names, value=reward_names, label="Reward scores",
                                               elem_id="compare-rewards")
                with gr.Accordion("Add a variant (a LoRA, run, checkpoint or denoiser folder inside the "
                                  "configured folders)", open=False):
                    with gr.Row():
                        new_name = gr.Textbox(label="Name", elem_id="variant-name")
                        new_path = gr.Textbox(label="Path", elem_id="variant-path")
                        add = gr.Button("Add variant", elem_id="variant-add")
                    add_status = gr.Markdown(visible=False, elem_id="variant-status")
                run_compare = gr.Button("Generate", variant="primary", elem_id="compare-run")
                compare_error = gr.Markdown(visible=False, elem_id="compare-error", elem_classes=["error-box"])
                gr.Markdown("A row per variant, a column per prompt and seed (the same noise down a column).")
                compare_grid = gr.Image(type="pil", format="png", interactive=False, show_label=False,
                                        elem_id="compare-grid", elem_classes=["pixelated"])
                with gr.Accordion("Single images (click one to enlarge)", open=False):
                    compare_gallery = gr.Gallery(format="png", columns=2, object_fit="contain",
                                                 elem_id="compare-gallery", elem_classes=["pixelated"])
                compare_summary = gr.Markdown(elem_id="compare-summary")
                compare_files = gr.File(label="Download: grid.png and scores.json", file_count="multiple",
                                        interactive=False, elem_id="compare-download")
                with gr.Accordion("Scores (JSON)", open=False):
                    compare_json = gr.JSON(elem_id="compare-json")

            # ------------------------------------------------------------ gallery
            with gr.Tab("Gallery", id="gallery"):
                with gr.Row():
                    gallery_prompts = gr.Textbox(default_prompts, label="Prompt list (one a line)", lines=8,
                                                 elem_id="gallery-prompts")
                    with gr.Column():
                        prompt_file = gr.Textbox(config.prompt_file or "", label="Prompt file (inside the "
                                                 "configured folders)", elem_id="gallery-file")
                        load_file = gr.Button("Load prompt file", elem_id="gallery-load")
                        shapes_per_task = gr.Number(2, label="Shapes held-out prompts a task", precision=0,
                                                    minimum=1, maximum=50)
                        load_shapes = gr.Button("Load shapes held-out prompts", elem_id="gallery-shapes")
                with gr.Row():
                    gallery_variants = gr.CheckboxGroup(variant_names, value=variant_names, label="Variants (columns)",
                                                        elem_id="gallery-variants")
                    gallery_reno = gr.CheckboxGroup(variant_names, value=[], label="ReNO on top of")
                    gallery_rewards = gr.CheckboxGroup(reward_names, value=reward_names, label="Reward scores")
                    gallery_seeds = gr.Textbox("0", label="Seeds", elem_id="gallery-seeds")
                run_gallery = gr.Button("Generate gallery", variant="primary", elem_id="gallery-run")
                gallery_error = gr.Markdown(visible=False, elem_id="gallery-error", elem_classes=["error-box"])
                gr.Markdown("A row per prompt, a column per variant (and seed).")
                gallery_grid = gr.Image(type="pil", format="png", interactive=False, show_label=False,
                                        elem_id="gallery-grid", elem_classes=["pixelated"])
                with gr.Accordion("Single images (click one to enlarge)", open=False):
                    gallery = gr.Gallery(format="png", columns=2, object_fit="contain", elem_id="gallery-gallery",
                                         elem_classes=["pixelated"])
                gallery_summary = gr.Markdown(elem_id="gallery-summary")
                gallery_files = gr.File(label="Download: grid.png and scores.json", file_count="multiple",
                                        interactive=False, elem_id="gallery-download")
                with gr.Accordion("Scores (JSON)", open=False):
                    gallery_json = gr.JSON()

            # ------------------------------------------------------------ labelling
            with gr.Tab("Label pairs", id="label"):
                with gr.Row():
                    pairs_dir = gr.Textbox(config.pairs_dir or "", label="Pairs folder (from `genalign d3po sample`)",
                                           elem_id="label-dir", scale=4)
                    open_pairs = gr.Button("Open", elem_id="label-open", scale=1)
                label_status = gr.Markdown("Open a pairs folder.", elem_id="label-status")
                with gr.Row():
                    left_image = gr.Image(label="Left (first image)", interactive=False, type="pil",
                                          elem_id="label-image-left", buttons=[])
                    right_image = gr.Image(label="Right (second image)", interactive=False, type="pil",
                                           elem_id="label-image-right", buttons=[])
                with gr.Row():
                    left = gr.Button("◀ Left is better", variant="primary", elem_id="label-left")
                    tie = gr.Button("Tie", elem_id="label-tie")
                    right = gr.Button("Right is better ▶", variant="primary", elem_id="label-right")
                with gr.Row():
                    previous = gr.Button("Previous pair", elem_id="label-prev")
                    skip = gr.Button("Next unlabelled", elem_id="label-next")
                    export = gr.Button("Export labels.json", elem_id="label-export")
                label_message = gr.Markdown(visible=False, elem_id="label-message")
                export_file = gr.File(label="labels.json", interactive=False, visible=False, elem_id="label-file")
                label_state = gr.State({"pairs_dir": None, "pair": None})

        # ---------------------------------------------------------------- compare / gallery callbacks

        outputs_compare = [compare_error, compare_grid, compare_gallery, compare_summary, compare_files, compare_json]

        @shows_errors(len(outputs_compare), 0)
        def on_compare(backbone_name, prompt_text, seed_text, chosen, reno_on, chosen_rewards, *sampling_values,
                       progress=gr.Progress()):
            return run_layout("compare", backbone_name, parse_prompts(prompt_text, 16), parse_seeds(seed_text, 16),
                              chosen, reno_on, chosen_rewards, settings_from(*sampling_values), progress)

        run_compare.click(on_compare, [backbone, prompts, seeds, variants, reno_rows, rewards, *sampling],
                          outputs_compare, api_name="compare", concurrency_limit=1, concurrency_id="models")

        outputs_gallery = [gallery_error, gallery_grid, gallery, gallery_summary, gallery_files, gallery_json]

        @shows_errors(len(outputs_gallery), 0)
        def on_gallery(backbone_name, prompt_text, seed_text, chosen, reno_on, chosen_rewards, *sampling_values,
                       progress=gr.Progress()):
            return run_layout("gallery", backbone_name, parse_prompts(prompt_text, MAX_PROMPTS),
                              parse_seeds(seed_text, 8), chosen, reno_on, chosen_rewards,
                              settings_from(*sampling_values), progress)

        run_gallery.click(on_gallery, [backbone, gallery_prompts, gallery_seeds, gallery_variants, gallery_reno,
                                       gallery_rewards, *sampling],
                          outputs_gallery, api_name="gallery", concurrency_limit=1, concurrency_id="models")

        @shows_errors(2, 1)
        def on_load_file(path_text):
            path = roots.check(path_text, "prompt file")
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {path_text!r} not found")
            text = path.read_text(errors="replace")
            parse_prompts(text, MAX_PROMPTS)
            return text, gr.update(value="", visible=False)

        load_file.click(on_load_file, [prompt_file], [gallery_prompts, gallery_error], api_name="load_prompt_file")

        @shows_errors(2, 1)
        def on_load_shapes(per_task):
            from genalign.shapes.world import evaluation_set

            metas = evaluation_set("heldout", per_task=int(per_task), seed=0)
            return "\n".join(m["prompt"] for m in metas), gr.update(value="", visible=False)

        load_shapes.click(on_load_shapes, [shapes_per_task], [gallery_prompts, gallery_error],
                          api_name="shapes_prompts")

        @shows_errors(5, 0)
        def on_add_variant(name, path_text, chosen, chosen_gallery):
            path = roots.check(path_text, "variant path")
            variant = bank.add_variant(name.strip(), path)
            names = [BASE, *bank.variants]
            return (gr.update(value=f"Added variant **{_md(variant.name)}** ({_md(str(path))}).", visible=True),
                    gr.update(choices=names, value=[*chosen, variant.name]), gr.update(choices=names),
                    gr.update(choices=names, value=[*chosen_gallery, variant.name]), gr.update(choices=names))

        add.click(on_add_variant, [new_name, new_path, variants, gallery_variants],
                  [add_status, variants, reno_rows, gallery_variants, gallery_reno], api_name="add_variant")

        # ---------------------------------------------------------------- labelling callbacks

        label_outputs = [label_message, label_status, left_image, right_image, label_state]

        def show(pairs: list[Pair], store: LabelStore, index: int | None, state: dict, note: str = "") -> tuple:
            labelled = sum(1 for p in pairs if p.id in store.labels)
            message = gr.update(value=note, visible=bool(note))
            if index is None:
                state = {**state, "pair": None}
                text = (f"**All {len(pairs)} pairs are labelled** ({store.path}). Use *Previous pair* to review "
                        "or *Export labels.json*." if pairs else "This folder has no pairs.")
                return message, text, None, None, state
            pair = pairs[index]
            current = store.choice(pair.id)
            text = (f"**Pair {pair.id}** ({index + 1} of {len(pairs)}) · {labelled} of {len(pairs)} labelled\n\n"
                    f"**Prompt:** {_md(pair.prompt)}")
            if current is not None:
                text += f"\n\nLabelled **{current}**; a new choice is appended to the labels file and counts instead."
            return message, text, _pair_image(pair.images[0]), _pair_image(pair.images[1]), \
                {**state, "pair": pair.id}

        def opened(state: dict) -> tuple[Path, list[Pair], LabelStore]:
            if not state.get("pairs_dir"):
                raise ValueError("open a pairs folder first")
            folder = Path(state["pairs_dir"])
            pairs, store = labelling.open(folder)
            return folder, pairs, store

        def position(pairs: list[Pair], pair_id: str | None) -> int | None:
            return next((i for i, p in enumerate(pairs) if p.id == pair_id), None)

        @shows_errors(len(label_outputs), 0)
        def on_open(path_text, state):
            folder = roots.check(path_text, "pairs folder")
            pairs, store = labelling.open(folder)
            state = {"pairs_dir": str(folder), "pair": None}
            note = f"{store.unreadable_lines} unreadable line(s) in {store.path} were skipped." \
                if store.unreadable_lines else ""
            return show(pairs, store, store.first_unlabelled(pairs), state, note)

        open_pairs.click(on_open, [pairs_dir, label_state], label_outputs, api_name="label_open")
        pairs_dir.submit(on_open, [pairs_dir, label_state], label_outputs, api_visibility="private")

        def make_label(choice: str) -> Callable[[dict], tuple]:
            @shows_errors(len(label_outputs), 0)
            def on_label(state):
                _, pairs, store = opened(state)
                index = position(pairs, state.get("pair"))
                if index is None:
                    raise ValueError("no pair is shown: open the folder again or go to a pair")
                pair = pairs[index]
                before = store.choice(pair.id)
                store.record(pair, choice)
                note = f"Pair {pair.id} relabelled {before} → {choice} (both lines kept)." \
                    if before is not None and before != choice else ""
                return show(pairs, store, store.first_unlabelled(pairs, index + 1), state, note)

            on_label.__name__ = f"on_label_{choice}"
            return on_label

        for button, choice in ((left, "left"), (right, "right"), (tie, "tie")):
            button.click(make_label(choice), [label_state], label_outputs, api_name=f"label_{choice}",
                         concurrency_limit=None)

        @shows_errors(len(label_outputs), 0)
        def on_previous(state):
            _, pairs, store = opened(state)
            index = position(pairs, state.get("pair"))
            index = len(pairs) - 1 if index is None else max(0, index - 1)
            return show(pairs, store, index if pairs else None, state)

        previous.click(on_previous, [label_state], label_outputs, api_name="label_previous")

        @shows_errors(len(label_outputs), 0)
        def on_next(state):
            _, pairs, store = opened(state)
            index = position(pairs, state.get("pair"))
            return show(pairs, store, store.first_unlabelled(pairs, 0 if index is None else index + 1), state)

        skip.click(on_next, [label_state], label_outputs, api_name="label_next")

        @shows_errors(2, 0)
        def on_export(state):
            _, pairs, store = opened(state)
            destination = store.export_json(store.path.with_suffix(".json"), [p.id for p in pairs])
            count = len([p for p in pairs if p.id in store.labels])
            out_dir.mkdir(parents=True, exist_ok=True)  # the download is a copy in the demo's output folder
            download = out_dir / f"labels-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
            shutil.copyfile(destination, download)
            return (gr.update(value=f"Wrote {count} labels to {destination} (train with "
                                    f"`method.labels={destination}`, or on {store.path} directly).", visible=True),
                    gr.update(value=str(download), visible=True))

        export.click(on_export, [label_state], [label_message, export_file], api_name="label_export")

        if config.pairs_dir:
            app.load(on_open, [pairs_dir, label_state], label_outputs, api_visibility="private")
    return app


def launch(app: Any, config: DemoConfig, block: bool = True) -> Any:
    """Serve on ``config.host`` (127.0.0.1 unless told otherwise); no share link unless asked, no
    analytics, system fonts only (no font CDN)."""
    gr = import_gradio()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return app.queue(default_concurrency_limit=1).launch(
        server_name=config.host, server_port=config.port, share=config.share, prevent_thread_lock=not block,
        show_error=True, allowed_paths=[str(out_dir.resolve())], theme=theme, css=PAGE_CSS, ssr_mode=False,
        mcp_server=False, pwa=False, footer_links=["api"], quiet=not block,
    )
