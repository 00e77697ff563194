"""Loading weights by hub id or local path, with one clear error when they are not there.

Shared by backbones (pipelines/) and rewards (rewards/), which may import only ``genalign.core``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class WeightsNotFoundError(FileNotFoundError):
    """Backbone or reward weights that are neither on disk nor reachable."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _missing(what: str, path: str, hint: str, err: BaseException) -> WeightsNotFoundError:
    where = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "the hub could not provide it"
    return WeightsNotFoundError(
        f"{what} '{path}' were not found: it is not a local path, not in the Hugging Face cache, and "
        f"{where}. {hint} ({err})"
    )


def from_pretrained_or_explain(loader: Any, path: str, *, hint: str = "", **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained(path, ...)``; turn "not found / offline" into one clear error."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if Path(path).exists():
            raise WeightsNotFoundError(f"cannot load weights from the local folder '{path}': {err}") from err
        raise _missing("weights", path, hint or "Point the path at a local folder or download it first", err) from err


def resolve_file(path: str, filename: str | None = None, *, hint: str = "") -> Path:
    """A local file for ``path`` (a file, or a folder holding ``filename``) or hub id ``path`` + ``filename``.

    Hub files come from the Hugging Face cache (downloaded when the hub is reachable).
    """
    local = Path(path)
    if local.is_file():
        return local
    if local.is_dir():
        if filename and (local / filename).is_file():
            return local / filename
        raise WeightsNotFoundError(f"the folder '{path}' has no file '{filename}'")
    if not filename:
        raise WeightsNotFoundError(f"weights file '{path}' does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, filename))
    except Exception as err:  # offline, missing repo/file, network: all the same to the user
        raise _missing(f"weights file '{filename}' of", path, hint or "Download it or give a local path", err) from err


class UnsafeFileError(ValueError):
    """A torch file holding more than tensors and plain containers (refused unpickling)."""


def load_torch_file(file: str | Path) -> Any:
    """``torch.load(file, weights_only=True)`` on the CPU: tensors, numbers, strings and containers
    only. A file that needs arbitrary unpickling (a possible code payload) is refused with one clear
    error; nothing in it runs."""
    import pickle

    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(
            f"refused to load {file}: it holds Python objects beyond tensors, which could run code when "
            f"unpickled ({reason[:200]}). Use a safetensors file, or re-save the state dict from a trusted "
            "environment"
        ) from err
