"""Backend registry: which engines exist and which one a sandbox gets.

Choice order: the ``backend=`` argument, else ``$MVM_BACKEND``, else the first of
``PREFERENCE`` this host can run (``vm`` — a real microVM — when QEMU and a
kernel are there, otherwise ``namespace``).
"""

from __future__ import annotations

import importlib
import os
from functools import cache

from .. import errors
from .base import Availability, Backend

#: name -> "module:Class"
_REGISTRY = {
    "vm": "mvm.backends.vm:VmBackend",
    "namespace": "mvm.backends.namespace:NamespaceBackend",
}
PREFERENCE = ("vm", "namespace")


def backend_names() -> list[str]:
    return list(_REGISTRY)


def pool_backend_names() -> list[str]:
    """The backends a warm pool can pre-start (``Backend.poolable``), in :data:`PREFERENCE` order."""
    names = []
    for name in PREFERENCE:
        try:
            if get_backend(name).poolable:
                names.append(name)
        except errors.BackendUnavailable:  # cannot even be loaded: nothing to pre-start
            pass
    return names


def isolation_of(name: str) -> str:
    """The kind of isolation a backend gives (``Backend.isolation``), for listings."""
    try:
        return get_backend(name).isolation
    except errors.MvmError:
        return "unknown"


@cache
def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise errors.InvalidArgument("backend", f"unknown backend {name!r}", allowed=backend_names())
    module_name, _, cls_name = _REGISTRY[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise errors.BackendUnavailable(f"backend {name!r} cannot be loaded: {exc}") from None
    backend: Backend = getattr(module, cls_name)()
    return backend


def availability(name: str) -> Availability:
    try:
        return get_backend(name).availability()
    except errors.BackendUnavailable as exc:
        return Availability(False, str(exc))


def choose_backend(requested: str | None = None) -> str:
    """Resolve the backend name for a new sandbox; raises if it cannot run here."""
    name = requested or os.environ.get("MVM_BACKEND") or None
    if name:
        get_backend(name)  # validates the name
        status = availability(name)
        if not status.ok:
            raise errors.BackendUnavailable(f"backend {name!r} is not usable on this host: {status.reason}",
                                            backend=name, reason=status.reason)
        return name
    reasons = []
    for candidate in PREFERENCE:
        status = availability(candidate)
        if status.ok:
            return candidate
        reasons.append(f"{candidate}: {status.reason}")
    raise errors.BackendUnavailable("no sandbox backend can run on this host (" + "; ".join(reasons) + ")")
