"""``genalign demo``: a Gradio page to compare fine-tuned variants and to label preference pairs.

Tabs:

- **Compare**: a backbone, any number of variants (rows; ``base`` is the backbone without
  adapters; each can also run with ReNO on top), prompts and seeds (a column per prompt and seed:
  every row starts from the same noise), each image with its reward scores and, for prompts of the
  shapes world, the exact evaluator's verdict. Download: a labelled grid.png and scores.json.
- **Gallery**: the same over a whole prompt list (a file, or the shapes held-out prompts), a row
  per prompt, with per-variant means (rewards, gold accuracy).
- **Label pairs**: the two images of each pair from ``genalign d3po sample``; *left*, *right* or
  *tie* is appended to a labels JSONL and fsynced before the page moves on; opening the folder
  again resumes at the first unlabelled pair. D3PO trains on that file as it is
  (``method.labels=<labels.jsonl>``: ``{"id", "preferred"}`` lines, the latest line of a pair
  wins) or on the exported ``labels.json`` (``{id: 0 | 1 | "tie"}``).

Command line (``genalign demo ...``; :func:`add_arguments`)::

    genalign demo --backbone models/shapes/sd --variant dpo=runs/shapes-diffusion-dpo/final \\
        --reward clip=models/shapes/clip --pairs runs/pairs --guidance-scale 2 --port 7860

    --backbone [NAME=]PATH   repeatable; a menu of backbones (one is loaded at a time)
    --family F               auto (model_index.json) or a backbone family (genalign list backbones)
    --variant NAME=PATH      LoRA file/folder, run folder, checkpoints/step-N, or full denoiser folder
    --reward NAME[=PATH]     reward adapters to score with (genalign.rewards names)
    --pairs DIR --labels FILE   the pairs to label and the labels JSONL (default DIR/labels.jsonl)
    --prompt-file FILE --out DIR --allow-root DIR
    --steps --guidance-scale --batch-size --max-images --reno-steps --reno-iterations --reno-lr
    --dtype --device --host (127.0.0.1) --port (7860) --share (off)

Safety: the server listens on 127.0.0.1 unless ``--host`` says otherwise, opens no share link
unless ``--share``, sends no analytics (``GRADIO_ANALYTICS_ENABLED=False``, system fonts instead of
a font CDN), and loads only the configured backbones and rewards; a path typed in the page
(variant, prompt file, pairs folder) must resolve inside the configured folders or
``--allow-root``. Errors appear in the page; the server keeps running.

gradio is imported only when the page is built (``pip install 'genalign[demo]'``), so importing
this package and ``genalign --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

from genalign.demo.command import add_arguments, config_from_args, run
from genalign.demo.config import (
    AllowedRoots,
    BackboneChoice,
    DemoConfig,
    PathNotAllowed,
    RewardChoice,
    VariantChoice,
)


def build_app(config: DemoConfig, bank: Any = None) -> Any:
    """The demo's ``gr.Blocks`` (serve it with :func:`launch`)."""
    from genalign.demo.app import build_app as build

    return build(config, bank)


def launch(app: Any, config: DemoConfig, block: bool = True) -> Any:
    """Serve ``app`` as ``config`` says (127.0.0.1, no share link, no analytics)."""
    from genalign.demo.app import launch as serve

    return serve(app, config, block)


__all__ = [
    "AllowedRoots", "BackboneChoice", "DemoConfig", "PathNotAllowed", "RewardChoice", "VariantChoice",
    "add_arguments", "build_app", "config_from_args", "launch", "run",
]
