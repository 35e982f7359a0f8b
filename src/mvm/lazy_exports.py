"""A package's public names loaded on first use (PEP 562): ``mvm``, ``mvm.templates``, ``mvm.snapshots``.

``import mvm`` (and ``mvmctl``, which imports ``mvm.cli``) should not pay for the SDK,
the template builder or their dependencies until a name from them is used. A package
lists ``{name: "module"}`` and does::

    __getattr__, __dir__ = lazy_exports(__name__, {"Sandbox": "mvm.sdk.sandbox"})

and imports the same names under ``if TYPE_CHECKING:`` as ``X as X`` so type checkers see
them. A name not listed raises ``AttributeError`` as usual; an import error of a listed
one propagates unchanged.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``exports`` maps a public name to the
    module defining it (absolute, or relative to ``package``: ``".store"``); ``submodules`` are
    public submodules (``mvm.errors`` right after ``import mvm``)."""
    namespace = sys.modules[package].__dict__
    public_submodules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in public_submodules:
            return importlib.import_module(f"{package}.{name}")
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports, *public_submodules})

    return __getattr__, __dir__
