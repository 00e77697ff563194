"""Fine-tuners, one file per method, registered by name for ``genalign train``.

A fine-tuner class has a ``Config`` dataclass (the ``method:`` section of an experiment) and a
``build(experiment, backbone, reward)`` classmethod (``reward``: the configured reward, a weighted
sum when several are listed, or None; value-based methods also take ``encoder``, the image-text
encoder their config's ``encoder_key`` names, loaded by the CLI); it fits
``genalign.core.types.FineTuner``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from genalign.core.registry import Registry

# every module of this package that calls ``register("name")`` is found and imported on first use
METHODS: Registry[Any] = Registry("method.name", decorator="genalign.finetuners.register", packages=["genalign.finetuners"])


def _check_method(cls: type[Any]) -> None:
    if not hasattr(cls, "Config") or not hasattr(cls, "build"):
        raise TypeError(f"fine-tuner {cls.__name__} needs a Config dataclass and a build() classmethod")


def register(name: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: make a fine-tuner available as ``method.name: <name>``."""
    return METHODS.register(name, check=_check_method)


def config_classes() -> dict[str, type]:
    """Method name -> its Config dataclass (what the experiment loader checks ``method:`` against)."""
    return {name: cls.Config for name, cls in METHODS.all().items()}
