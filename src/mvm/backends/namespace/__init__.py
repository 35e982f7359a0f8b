"""The ``namespace`` backend: bubblewrap namespaces, an overlay root, cgroup limits, seccomp.

``isolation="namespace"``: processes share the host's kernel. See ``backend.py``.
"""

from .backend import NamespaceBackend, NamespaceInstance, backend, cleanup_orphan

__all__ = ["NamespaceBackend", "NamespaceInstance", "backend", "cleanup_orphan"]
