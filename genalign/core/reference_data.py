"""Reference data shipped inside the package (``genalign/data/``), each folder with its licence and
source in ``genalign/data/README.md``: the official GenEval prompts and class names, the
T2I-CompBench validation prompt lists, and the LAION aesthetic predictor's MLP head.

These are the defaults of ``genalign eval geneval --generate``, ``genalign eval t2i-compbench`` and
the ``aesthetic`` reward, so an installed genalign needs no file beside it.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"


def _packaged(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"genalign's packaged reference data {path} is missing: the installation is "
                                "incomplete (reinstall genalign; the files live in genalign/data/)")
    return path


def geneval_metadata() -> Path:
    """GenEval's ``evaluation_metadata.jsonl``: the 553 official prompts (djghosh13/geneval, MIT)."""
    return _packaged("geneval", "evaluation_metadata.jsonl")


def geneval_object_names() -> Path:
    """GenEval's ``object_names.txt``: the 80 COCO class names in the detector's order."""
    return _packaged("geneval", "object_names.txt")


def t2i_compbench_dir() -> Path:
    """The folder of T2I-CompBench(++)'s ``{category}_val.txt`` prompt files (Karine-Huang/T2I-CompBench
    ``examples/dataset/``, MIT)."""
    return _packaged("t2i_compbench")


def aesthetic_head() -> Path:
    """The LAION aesthetic predictor v2 MLP (``sac+logos+ava1-l14-linearMSE.pth``, Apache-2.0),
    converted tensor for tensor to safetensors (keys ``layers.{0,2,4,6,7}.{weight,bias}``)."""
    return _packaged("aesthetic", "sac+logos+ava1-l14-linearMSE.safetensors")
