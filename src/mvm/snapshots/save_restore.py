"""Sealed snapshots of a backend instance: the supervisor's save and restore paths.

A backend that streams its memory image (``streams_memory``: the VM) gets a sink
from the snapshot store, so the image goes QEMU -> sealer -> store in one pass; on
restore, after everything else was verified, it goes store -> unsealer -> QEMU.
It is never a plain file, and it is read once: the unsealer authenticates every chunk
before QEMU gets it and hashes the blob as it passes, withholding the last chunk unless
the whole sha256 is the signed manifest's; the VM resumes only after that verdict.
Everything else (the VM's disk layer and ``vm.json``, a
namespace sandbox's archive) is written to a private staging directory and sealed
from there, as before.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from ..backends.base import MEMORY_IMAGE, BackendInstance, MemorySink, MemorySource, Resources, SnapshotArtifacts
from .. import errors
from .model import Snapshot
from .store import SnapshotStore
from .streams import SealSink

Runner = Callable[[Callable[[], Any]], Any]


class _Streaming(Protocol):
    """A backend instance with ``streams_memory`` (see ``mvm.backends.base``)."""

    def snapshot(self, dest: Path, *, memory_sink: MemorySink | None = None) -> SnapshotArtifacts: ...

    def restore(self, source: Path, artifacts: SnapshotArtifacts, *,
                memory_source: MemorySource | None = None) -> socket.socket: ...


def _direct(fn: Callable[[], Any]) -> Any:
    return fn()


def save(instance: BackendInstance, store: SnapshotStore, name: str, sandbox_id: str, *, staging_parent: Path,
         expires: Any = None, keep: bool = False, run: Runner = _direct) -> tuple[Snapshot, SnapshotArtifacts]:
    """Snapshot ``instance`` into ``store``; ``run`` executes backend calls (the
    supervisor's backend thread). Nothing is left in the store on failure; a full disk
    is a :class:`SandboxError` saying so."""
    try:
        return _save(instance, store, name, sandbox_id, staging_parent=staging_parent, expires=expires, keep=keep,
                     run=run)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise errors.SandboxError(f"snapshot {name!r} was not saved: {exc.strerror} "
                                  f"({exc.filename or store.root}); the earlier snapshots are intact") from exc


def _save(instance: BackendInstance, store: SnapshotStore, name: str, sandbox_id: str, *, staging_parent: Path,
          expires: Any, keep: bool, run: Runner) -> tuple[Snapshot, SnapshotArtifacts]:
    with store.begin(name, sandbox_id, expires, keep) as pending:
        sink = pending.stream(MEMORY_IMAGE) if instance.streams_memory else None
        staging = Path(tempfile.mkdtemp(prefix="snap-", dir=staging_parent))
        try:
            call = (functools.partial(cast(_Streaming, instance).snapshot, staging, memory_sink=sink)
                    if sink is not None else functools.partial(instance.snapshot, staging))
            try:
                artifacts: SnapshotArtifacts = run(call)
            except errors.MvmError as exc:
                raise _root_cause(sink, exc) from exc
            if sink is not None and MEMORY_IMAGE not in artifacts.streamed:
                pending.drop(MEMORY_IMAGE)
            # the sandbox's shape goes with it: a restore takes it unless asked for another
            details = {**artifacts.details, "resources": instance.spec.resources.to_json()}
            info = pending.commit(artifacts.kind, staging,
                                  files=[f for f in artifacts.files if f not in artifacts.streamed],
                                  details=details)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return info, artifacts


def _root_cause(sink: SealSink | None, failure: errors.MvmError) -> errors.MvmError:
    """The sealer's own error when the memory stream broke because sealing failed (the
    disk is full): the backend only saw a broken pipe."""
    if sink is not None:
        try:
            sink.finish(timeout=10)
        except errors.SandboxError as sealing:
            return errors.SandboxError(f"snapshot was not saved: {sealing.message}")
    return failure


def shape(store: SnapshotStore, snapshot: str) -> Resources:
    """The resources of the sandbox ``snapshot`` was taken from (what a sandbox created
    from it gets unless its creator asks for others). ``SnapshotNotFound`` if there is
    none. Snapshots older than this record fall back to the VM's memory and vCPUs."""
    details = store.get(snapshot).details
    recorded = details.get("resources")
    if isinstance(recorded, dict):
        known = {f.name for f in dataclasses.fields(Resources)}
        return Resources.from_json({k: v for k, v in recorded.items() if k in known})
    defaults = Resources()
    return Resources(cpu_cores=float(details.get("vcpus", defaults.cpu_cores)),
                     memory_mb=int(details.get("memory_mb", defaults.memory_mb)))


def restore(instance: BackendInstance, store: SnapshotStore, snapshot: str, *,
            run: Runner = _direct, replacing: Callable[[], None] | None = None) -> tuple[socket.socket, Snapshot]:
    """Verify ``snapshot``, then restore ``instance`` from it (memory streamed when the
    backend can); returns the agent socket. ``SnapshotTampered`` before any byte reaches
    the backend if anything is off, but for a streamed memory image: that one is
    verified while the backend reads it (each chunk authenticated before it is given,
    the whole sha256 before the last chunk is), and on a failure the backend kills its
    reader before the guest ran and ``SnapshotTampered`` is raised.
    ``replacing`` stops what runs now; it is called once the snapshot was found and
    opened, so an unknown snapshot leaves a running sandbox untouched."""
    # One read of the manifest: restoring() finds the snapshot, verifies it and opens it;
    # a snapshot without a memory image simply has no source for it.
    wanted = (MEMORY_IMAGE,) if instance.streams_memory else ()
    with store.restoring(snapshot, stream=wanted) as opened:
        if replacing is not None:
            replacing()
        source = opened.source(MEMORY_IMAGE)
        stream = (MEMORY_IMAGE,) if source is not None else ()
        artifacts = SnapshotArtifacts(kind=opened.info.kind, files=opened.info.files,  # type: ignore[arg-type]
                                      details=dict(opened.info.details), streamed=stream)
        call = (functools.partial(cast(_Streaming, instance).restore, opened.path, artifacts, memory_source=source)
                if source is not None else functools.partial(instance.restore, opened.path, artifacts))
        sock: socket.socket = run(call)
    return sock, opened.info
