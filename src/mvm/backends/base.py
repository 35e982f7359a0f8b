"""The backend interface: the few verbs a sandbox engine must provide.

A ``Backend`` knows whether this host can run it and makes ``BackendInstance``
objects, one per sandbox. The supervisor owns the instance and is the only
caller. Everything backend-specific (bwrap flags, QEMU command lines, cgroup
paths, QMP) lives behind this interface in ``mvm.backends.<name>``.

A backend that captures guest memory (the VM) can stream the memory image of a
snapshot through a ``MemorySink`` and read it back from a ``MemorySource`` (both
given by the supervisor, which seals and unseals on the way) instead of writing it
into the snapshot directory: it then never exists as a plain file.

Each instance records what it must undo (pids, mounts, cgroups, disk files) in
``spec.state_dir / "backend"`` so that ``Backend.cleanup_orphan`` can remove a
sandbox whose supervisor died without calling ``destroy``.
"""

from __future__ import annotations

import abc
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

# Resources, NetworkPolicy and the host alias are defined in mvm.spec; re-exported for backends.
from ..spec import HOST_ALIAS as HOST_ALIAS
from ..spec import HOST_ALIAS_ADDRESS as HOST_ALIAS_ADDRESS
from ..spec import NetworkPolicy as NetworkPolicy
from ..spec import Resources as Resources
from ..errors import SandboxError

if TYPE_CHECKING:  # an annotation only: the registry (`mvmctl` start-up) need not load templates
    from ..templates.image import TemplateImage


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to make one sandbox."""

    sandbox_id: str
    template: TemplateImage
    resources: Resources
    network: NetworkPolicy
    state_dir: Path  # $MVM_HOME/sandboxes/<id>; the backend owns state_dir / "backend"

    @property
    def backend_dir(self) -> Path:
        return self.state_dir / "backend"


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on this host, and why not."""

    ok: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotArtifacts:
    """What a backend wrote into a snapshot directory.

    ``kind`` is ``"full"`` when memory, devices and disk were captured (the VM),
    ``"filesystem"`` when only the writable layer was (namespaces): never claim
    memory was kept when it wasn't.
    """

    kind: Literal["full", "filesystem"]
    files: tuple[str, ...]  # names relative to the snapshot directory
    details: dict[str, Any] = field(default_factory=dict)
    # Those of ``files`` that went to the ``memory_sink`` instead of the directory.
    streamed: tuple[str, ...] = ()


#: The name of the guest memory image in a ``"full"`` snapshot.
MEMORY_IMAGE = "memory.bin"


class MemorySink(Protocol):
    """Where ``snapshot(dest, memory_sink=...)`` streams the memory image (the sealer)."""

    def command(self) -> str:
        """A shell command that reads the whole image on its stdin."""
        ...

    def finish(self, timeout: float = ...) -> int:
        """Block until the image is stored; returns its size. Raises if it was not stored."""
        ...


class MemorySource(Protocol):
    """Where ``restore(..., memory_source=...)`` reads the memory image from (the unsealer)."""

    def command(self) -> str:
        """A shell command that writes the whole image to its stdout."""
        ...

    def finish(self, timeout: float = ...) -> None:
        """Block until the image was delivered whole and authentic; raises otherwise
        (``SnapshotTampered`` when it was not authentic). Call before handing the
        restored guest out."""
        ...


class BackendInstance(abc.ABC):
    """One sandbox's engine. Methods block until the state change is done."""

    spec: SandboxSpec
    #: ``snapshot`` takes ``memory_sink=`` and ``restore`` takes ``memory_source=``
    #: (keyword-only, ``None`` by default): the memory image (``MEMORY_IMAGE``) is then
    #: streamed through them and never written to ``dest`` or read from ``source``.
    streams_memory: ClassVar[bool] = False

    @abc.abstractmethod
    def start(self) -> socket.socket:
        """Boot (or re-start after ``stop``) and return a connected stream socket to the
        guest agent. The caller does the protocol hello over it."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Halt every guest process but keep the writable disk so ``start`` works again."""

    @abc.abstractmethod
    def pause(self) -> None:
        """Freeze all guest execution (QMP stop / cgroup freezer)."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Undo ``pause``."""

    @abc.abstractmethod
    def snapshot(self, dest: Path) -> SnapshotArtifacts:
        """Write a consistent snapshot into the empty directory ``dest``. The sandbox is
        left running (or paused, if it was) afterwards. (With ``streams_memory``, see
        ``memory_sink`` there.)"""

    @abc.abstractmethod
    def restore(self, source: Path, artifacts: SnapshotArtifacts) -> socket.socket:
        """Replace this (stopped or never started) instance's state with a snapshot and
        run it; returns a connected socket to the agent as ``start`` does. (With
        ``streams_memory``, see ``memory_source`` there.)"""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Stop everything and remove every trace it made (mounts, cgroups, files)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Facts for ``describe()``: at least ``isolation`` and backend-specific notes
        (accelerator, cgroup version, security trade-offs such as disabled guest ASLR)."""

    def host_pids(self) -> list[int]:
        """Host pids that belong to this sandbox (for diagnostics and cleanup)."""
        return []

    def watch_agent(self, on_agent_gone: Callable[[], None]) -> bool:
        """Have ``on_agent_gone`` called (on some thread) when the guest agent died while the
        guest goes on: its init starts a new agent, reached with ``reconnect_agent``. False:
        this backend cannot restart an agent (its death ends the sandbox)."""
        return False

    def reconnect_agent(self) -> socket.socket:
        """A fresh connection to the (new) guest agent, as ``start`` returns one."""
        raise SandboxError("this backend cannot reach a restarted guest agent")

    def agent_limits(self) -> dict[str, Any]:
        """Limits the guest agent must enforce itself (sent with ``agent.configure``): those
        nothing on the host can apply from outside, such as a VM's process count."""
        return {}


class Backend(abc.ABC):
    """A kind of sandbox engine (``vm``, ``namespace``)."""

    name: str
    isolation: str  # "vm" or "namespace"
    #: The guest agent runs on this host's kernel and the socket ``start`` returns is one end of
    #: an AF_UNIX socketpair: the agent can hand connected sockets to the supervisor (SCM_RIGHTS),
    #: which then relays forwards and egress itself (docs/security.md, "Network relays").
    agent_shares_kernel: ClassVar[bool] = False
    #: A warm pool (``mvm.pool``) may pre-start sandboxes of this backend. A VM create already
    #: restores a ready snapshot, and a pooled VM would hold its whole memory while it waits.
    poolable: ClassVar[bool] = False

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Whether this host can run the backend; cheap enough to call from ``doctor``."""

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> BackendInstance:
        """Prepare (but do not start) an instance for ``spec``."""

    @abc.abstractmethod
    def cleanup_orphan(self, state_dir: Path) -> None:
        """Remove what an instance recorded under ``state_dir / "backend"`` after its
        supervisor died. Must be idempotent and never raise for already-gone things."""
