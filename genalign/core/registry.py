"""One registry mechanism for methods, backbones and rewards.

A class registers itself in its own file with the registry's decorator (``@register("ddpo")``), and
that file is all a new method, backbone or reward needs. The registry finds the files without a
hand-kept list and without importing them: it reads the source of the packages it covers for calls
of its decorator with a literal name (``@register("x")`` or ``register("x")(cls)``), so ``names()``
is cheap enough for ``--help`` choices, and a module is imported the first time one of its names is
looked up. Classes registered elsewhere (a test's toy method, a user's plug-in) are found once their
module has been imported.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from genalign.core.config import ConfigError


def _imported_names(tree: ast.Module, module: str = "") -> dict[str, str]:
    """Local name -> the qualified name it was imported as (any ``import`` / ``from`` in the file;
    relative ones resolved against ``module``, the file's own module name)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                if not module or node.level >= len(parts):  # a module file, not a package __init__
                    continue
                base = ".".join(parts[: len(parts) - node.level])
                source = ".".join(part for part in (base, node.module) if part)
            else:
                source = node.module or ""
            for alias in node.names:
                names[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    names[head] = head
    return names


def _qualified(node: ast.expr, imported: dict[str, str]) -> str | None:
    """``register`` / ``rewards.register`` -> the qualified name it refers to, if it was imported."""
    if isinstance(node, ast.Name):
        return imported.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _qualified(node.value, imported)
        return f"{base}.{node.attr}" if base else None
    return None


def registered_names(source: str | bytes, decorators: Iterable[str], module: str = "") -> list[str]:
    """The literal names a module's source registers through any of ``decorators`` (qualified).
    Every call in the file counts, also one under an ``if`` (``Registry.get`` says so if it did not
    happen); a name that is not a literal cannot be read and is found once its module is imported."""
    tree = ast.parse(source)
    imported = _imported_names(tree, module)
    wanted = set(decorators)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str) and _qualified(node.func, imported) in wanted):
            found.append(node.args[0].value)
    return found


def _package_modules(package: str) -> Iterator[tuple[str, Path]]:
    """(module name, file) of every ``.py`` file directly in a package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not a package")
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("*.py")):
            if path.stem != "__init__":
                yield f"{package}.{path.stem}", path


T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> classes of one kind (subclasses of ``T``) (``key`` is the config field that selects them, for errors).

    ``decorator`` is the qualified name of the public decorator that calls :meth:`register`;
    ``packages`` are searched for its calls, ``modules`` are single extra modules.
    """

    def __init__(self, key: str, decorator: str, packages: Iterable[str] = (), modules: Iterable[str] = ()):
        self.key, self.decorator = key, decorator
        self.packages, self.modules = tuple(packages), tuple(modules)
        self._classes: dict[str, type[T]] = {}
        self._where: dict[str, str] | None = None

    def register(self, name: str, check: Callable[[type[T]], None] | None = None) -> Callable[[type[T]], type[T]]:
        """Class decorator: make ``cls`` selectable as ``name`` (``check`` may refuse it)."""

        def add(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.key} {name!r} is registered twice ({self._classes[name].__name__}, "
                                 f"{cls.__name__})")
            home = self.where().get(name)
            if home is not None and home != cls.__module__ and home not in sys.modules:
                # the name belongs to a file not imported yet: registering it here would shadow it
                raise ValueError(f"{self.key} {name!r} is registered twice ({home}, {cls.__module__})")
            if check is not None:
                check(cls)
            self._classes[name] = cls
            return cls

        return add

    def where(self) -> dict[str, str]:
        """Name -> the module that registers it, read from the source (cached)."""
        if self._where is None:
            files = [item for package in self.packages for item in _package_modules(package)]
            for module in self.modules:
                spec = importlib.util.find_spec(module)
                if spec is not None and spec.origin:
                    files.append((module, Path(spec.origin)))
            found: dict[str, str] = {}
            for module, path in files:
                for name in registered_names(path.read_bytes(), {self.decorator}, module):
                    found.setdefault(name, module)
            self._where = found
        return self._where

    def names(self) -> list[str]:
        """Every name, shipped or registered at run time, sorted; imports nothing."""
        return sorted({*self.where(), *self._classes})

    def __contains__(self, name: object) -> bool:
        return name in self._classes or name in self.where()

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``, importing its module on first use."""
        if name not in self._classes and name in self.where():
            module = self.where()[name]
            importlib.import_module(module)
            if name not in self._classes:
                raise ConfigError(f"{self.key} {name!r}: {module} names it but did not register it (a condition "
                                  "around its register call?)")
        if name not in self._classes:
            raise ConfigError(f"unknown {self.key} {name!r}; available: {', '.join(self.names())}")
        return self._classes[name]

    def all(self) -> dict[str, type[T]]:
        """Name -> class of every name (imports every module that registers one)."""
        return {name: self.get(name) for name in self.names()}
