"""The mvm node agent: one detached Ray actor per node (``mvm-node-<node id>``).

It owns nothing the host cannot rebuild: sandboxes are found from the node's
``$MVM_HOME/sandboxes`` records, each keeps its own detached supervisor (TTL included),
and the agent's only memory is open supervisor connections. Restarting the agent (or
the whole Ray node process tree while the machine lives) loses no sandbox.

Every method answers plain data; an ``MvmError`` travels as ``("error", wire)`` and is
rebuilt on the caller's side by ``errors.from_wire`` (the same as on the local socket).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import errors
from ..protocol.codec import GRANT_STEP, STREAM_WINDOW
from ..spec import Resources
from . import directory
from .placement import NodeReport, SandboxRequest

#: Bytes per item when a snapshot streams from one node to another.
TRANSFER_CHUNK = 4 * 1024 * 1024
#: A relayed request's ``data`` items carry frames of at most ``GRANT_STEP`` bytes in all
#: (or one larger frame) and at most this many travel unconsumed (Ray's generator
#: backpressure): one ``STREAM_WINDOW`` on the Ray hop, the same credit as on the local
#: socket (docs/protocol.md, "Flow control"). A transfer between nodes holds as many
#: ``TRANSFER_CHUNK`` items at most.
ITEMS_IN_FLIGHT = STREAM_WINDOW // GRANT_STEP


def streaming_options() -> dict[str, Any]:
    """The Ray call options of every streaming generator of the node agent (the relays
    ``call_streaming`` and ``stream``, the transfers ``export_snapshot`` and
    ``export_template``): it runs only as far as its caller consumes it."""
    return {"num_returns": "streaming", "_generator_backpressure_num_objects": ITEMS_IN_FLIGHT}


@dataclass(frozen=True)
class NodeLimits:
    """What one node accepts. ``None`` = the host's own size (CPUs x ``cpu_overcommit``,
    80% of its memory); ``max_sandboxes`` ``None`` = no count limit."""

    max_sandboxes: int | None = None
    cpu_cores: float | None = None
    memory_mb: int | None = None
    cpu_overcommit: float = 4.0


Reply = tuple[str, Any, Any]


def _error(exc: errors.MvmError) -> Reply:
    return ("error", exc.to_wire(), None)


class NodeAgent:
    """The Ray actor's body (``mvm.cluster.nodes`` makes it remote)."""

    def __init__(self, node_id: str, limits: NodeLimits | None = None):
        self.node_id = node_id
        self.limits = limits or NodeLimits()
        self._lock = threading.Lock()  # creates are checked against the limits one at a time
        self._reserved: list[SandboxRequest] = []  # creates admitted and still starting
        self._clients_lock = threading.Lock()
        # (sandbox id, principal as JSON or None) -> SupervisorClient (a cache, rebuildable)
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._streams: dict[str, Any] = {}  # stream token -> its own SupervisorClient, for cancel
        self._relays: dict[str, _Relay] = {}  # the requests whose data frames are relayed now

    # ---- what this node is ----------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Capacity and health: the placement's input."""
        from ..backends import availability, backend_names
        from ..paths import mvm_home
        from ..templates import list_templates

        records = [r for r in self._records() if r["state"] != "lost"]  # a lost one runs nothing
        with_starting = [*records, *({"resources": {"cpu_cores": r.cpu_cores, "memory_mb": r.memory_mb}}
                                     for r in list(self._reserved))]
        cpus = os.cpu_count() or 1
        total_mb = _mem_total_mb()
        asked = [{**Resources().to_json(), **r.get("resources", {})} for r in with_starting]
        report = NodeReport(
            node_id=self.node_id,
            home=str(mvm_home()),
            backends=[name for name in backend_names() if availability(name).ok],
            templates=sorted({t["name"] for t in list_templates()}),
            sandboxes=len(with_starting),
            cpu_used=sum(float(r["cpu_cores"]) for r in asked),
            memory_used_mb=sum(int(r["memory_mb"]) for r in asked),
            cpu_limit=self.limits.cpu_cores if self.limits.cpu_cores is not None else cpus * self.limits.cpu_overcommit,
            memory_limit_mb=self.limits.memory_mb if self.limits.memory_mb is not None else int(total_mb * 0.8),
            max_sandboxes=self.limits.max_sandboxes,
            memory_available_mb=_mem_available_mb(),
            load_average=os.getloadavg()[0],
        )
        return asdict(report)

    def ping(self) -> str:
        return self.node_id

    # ---- sandboxes on this node ----------------------------------------------------

    def create(self, template: str, options: dict[str, Any]) -> Reply:
        """Create a sandbox here if the node's limits allow it (checked under a lock, so
        concurrent creates cannot overshoot). Returns ``("ok", record, None)``."""
        from ..sdk.sandbox import Sandbox

        try:
            request = SandboxRequest.of(template, options)
            with self._lock:  # check and reserve together; the create itself runs unlocked
                fits, reason = NodeReport(**self.report()).fits(request)
                if not fits:
                    raise errors.NoCapacity(f"node {self.node_id[:12]} is full: {reason}", node=self.node_id,
                                            reason=reason)
                self._reserved.append(request)
            try:
                sandbox = Sandbox.create(template, **options)
            finally:
                with self._lock:
                    self._reserved.remove(request)
            sandbox.close()
            record = self._record(sandbox.id)
            directory.remember(record)
            return ("ok", record, None)
        except errors.MvmError as exc:
            return _error(exc)

    def sandboxes(self) -> list[dict[str, Any]]:
        """This node's sandbox records (the supervisors' own files, not a copy; state
        ``lost`` where the supervisor died)."""
        return self._records()

    def locate(self, name_or_id: str) -> dict[str, Any] | None:
        for record in self._records():
            if name_or_id in (record.get("id"), record.get("name")):
                return dict(record)
        return None

    # ---- the data path: requests relayed to the local supervisor -------------------

    def call(self, sandbox_id: str, op: str, args: dict[str, Any] | None, payload: bytes,
             timeout: float | None, on_behalf_of: dict[str, str] | None = None) -> Reply:
        """One request, no data frames wanted: ``("ok", result, payload)``. ``on_behalf_of``:
        who the caller acts for (its requests go over a connection whose hello says so)."""
        try:
            result, data = self._client(sandbox_id, on_behalf_of).call(op, args, payload, timeout=timeout)
        except errors.MvmError as exc:
            self._forget_if_gone(sandbox_id, op)
            return _error(exc)
        self._forget_if_gone(sandbox_id, op)
        return ("ok", result, data)

    def call_many(self, sandbox_id: str, requests: list[tuple[str, dict[str, Any] | None, bytes]],
                  on_behalf_of: dict[str, str] | None = None) -> list[Reply]:
        """A window of requests sent together (``Transport.call_many``): every reply, in
        order, once all are answered -- or one error reply if any failed (the first)."""
        try:
            answers = self._client(sandbox_id, on_behalf_of).call_many(requests)
        except errors.MvmError as exc:
            return [_error(exc)]
        return [("ok", result, data) for result, data in answers]

    def call_streaming(self, sandbox_id: str, op: str, args: dict[str, Any] | None, payload: bytes,
                       timeout: float | None, on_behalf_of: dict[str, str] | None = None) -> Iterator[Reply]:
        """A request whose ``data`` frames the caller wants as they come (a Ray streaming
        generator, called with ``streaming_options()``): ``("data", [(stream, bytes), ...], None)``
        items, then ``("ok", result, payload)``. Flow-controlled end to end (see ``_Relay``)."""

        def run(put: Callable[[str, bytes], None]) -> Reply:
            result, data = self._client(sandbox_id, on_behalf_of).call(op, args, payload, timeout=timeout,
                                                                       on_data=put)
            return ("ok", result, data)

        yield from self._relayed(op, run)

    def open_stream(self) -> str:
        return uuid.uuid4().hex

    def stream(self, token: str, sandbox_id: str, op: str, args: dict[str, Any] | None,
               idle_timeout: float | None = None, on_behalf_of: dict[str, str] | None = None) -> Iterator[Reply]:
        """A streaming op (``proc.attach``, ``sandbox.logs``) on its own connection, so
        ``cancel_stream(token)`` can end it from another request. Flow-controlled as
        ``call_streaming``."""
        from ..supervisor.client import SupervisorClient

        try:
            client = SupervisorClient(self._socket(sandbox_id), on_behalf_of=on_behalf_of)
        except errors.MvmError as exc:
            yield _error(exc)
            return
        self._streams[token] = client

        def run(put: Callable[[str, bytes], None]) -> Reply:
            for stream, data in client.stream(op, args, idle_timeout=idle_timeout):
                put(stream, data)  # (the next frame is granted once the relay took this one)
            return ("ok", {}, b"")

        try:
            yield from self._relayed(op, run)
        finally:
            self._streams.pop(token, None)
            client.close()

    def relay_status(self) -> dict[str, Any]:
        """What the relays hold now: this agent's pid and resident memory, and per relayed
        request the bytes buffered here and the most it ever held (tests, benches)."""
        return {"pid": os.getpid(), "rss_bytes": _rss_bytes(),
                "relays": [relay.status() for relay in list(self._relays.values())]}

    def _relayed(self, op: str, run: Callable[[Callable[[str, bytes], None]], Reply]) -> Iterator[Reply]:
        """``run(put)`` talks to the supervisor on a thread of its own, handing each ``data``
        frame to ``put``; its items are yielded here, at the caller's pace (``_Relay``)."""
        relay = _Relay(op)
        key = uuid.uuid4().hex
        self._relays[key] = relay

        def work() -> None:
            try:
                relay.finish(run(relay.put))
            except errors.MvmError as exc:
                relay.finish(_error(exc))
            except BaseException as exc:  # never leave the generator waiting, even on an agent bug
                relay.finish(_error(errors.SandboxError(f"{op}: relay failed: {exc!r}")))
                raise

        threading.Thread(target=work, name=f"mvm-relay-{op}", daemon=True).start()
        try:
            yield from relay.items()
        finally:
            relay.close()
            self._relays.pop(key, None)

    def cancel_stream(self, token: str) -> None:
        client = self._streams.pop(token, None)
        if client is not None:
            client.close()

    # ---- snapshots move between nodes ----------------------------------------------

    def export_snapshot(self, snapshot_id: str) -> Iterator[bytes]:
        """The snapshot directory as a tar stream (sealed blobs and the signed manifest;
        never a key), in ``TRANSFER_CHUNK`` pieces."""
        from ..paths import snapshots_dir

        directory = snapshots_dir() / snapshot_id
        if not directory.is_dir():
            raise errors.SnapshotNotFound(f"no snapshot {snapshot_id!r} on node {self.node_id[:12]}",
                                          snapshot=snapshot_id)
        buffer = _ChunkSink()
        with tarfile.open(fileobj=buffer, mode="w|") as tar:
            for path in sorted(directory.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
                yield from buffer.drain()
        yield from buffer.drain(final=True)

    def import_snapshot(self, snapshot_id: str, source: Any) -> Reply:
        """Pull ``snapshot_id`` from the node agent ``source`` (node to node: the bytes do
        not pass the caller), unpack it into this node's store and verify the manifest's
        signature and every blob's sha256 with this node's keys."""
        from ..paths import snapshots_dir
        from ..snapshots import verify_snapshot

        import ray

        target = snapshots_dir() / snapshot_id
        if target.exists():
            return ("ok", {"snapshot": snapshot_id, "bytes": 0, "already": True}, None)
        # Unpacked under a private parent, in a directory already named as the snapshot
        # (the manifest names its directory), then moved into the store in one rename.
        parent = snapshots_dir() / f".import-{snapshot_id}-{os.getpid()}"
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir(mode=0o700)
        staging = parent / snapshot_id
        archive = parent / "transfer.tar"
        received = 0
        try:
            with open(archive, "wb") as out:
                for ref in source.export_snapshot.options(**streaming_options()).remote(snapshot_id):
                    chunk = ray.get(ref)
                    received += len(chunk)
                    out.write(chunk)
            staging.mkdir(mode=0o700)
            with tarfile.open(archive, mode="r:") as tar:
                tar.extractall(staging, filter="data")
            verify_snapshot(staging, key=_snapshot_key())
            os.replace(staging, target)
        except (errors.MvmError, ray.exceptions.RayTaskError) as exc:
            cause = getattr(exc, "cause", exc)
            if isinstance(cause, errors.MvmError):
                return _error(cause)
            raise
        finally:
            shutil.rmtree(parent, ignore_errors=True)
        return ("ok", {"snapshot": snapshot_id, "bytes": received, "already": False}, None)

    # ---- templates move between nodes ----------------------------------------------

    def export_template(self, name: str) -> Iterator[bytes]:
        """This node's current build of catalog template ``name`` as a tar stream
        (system ``tar``: owners, modes, xattrs and device nodes of the rootfs kept). Only the
        build itself (``BUILD_FILES``): the ext4 disks derived from it stay node-local (they
        are rebuilt where needed, and one may be in the making while this runs)."""
        import subprocess

        from ..templates.image import BUILD_FILES

        built = _current_build(name)
        if built is None:
            raise errors.TemplateNotFound(name, [], reason=f"not built on node {self.node_id[:12]}")
        members = [f"./{member}" for member in BUILD_FILES if (built / member).exists()]
        tar = subprocess.Popen(["tar", "-C", str(built), "--xattrs", "--numeric-owner", "-cf", "-", *members],
                               stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            while chunk := tar.stdout.read(TRANSFER_CHUNK):
                yield chunk
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                raise errors.TemplateBuildError(f"tar of template {name} failed on node {self.node_id[:12]}")

    def import_template(self, name: str, source: Any) -> Reply:
        """Pull template ``name`` from the node agent ``source`` instead of building it.
        The build key (name + content digest of recipe and agent) is computed here, so a
        node with different mvm code refuses a foreign build rather than using it."""
        import subprocess

        import ray

        from ..templates import store
        from ..templates.builder import load_image

        try:
            key = store.template_key(name, _current_digest(name))
            target = _templates_dir() / key
            with store.build_lock(key):
                if load_image(target) is not None:
                    return ("ok", {"template": name, "bytes": 0, "already": True}, None)
                staging = store.make_temp_dir(key)
                received = 0
                try:
                    tar = subprocess.Popen(["tar", "-C", str(staging), "--xattrs", "--numeric-owner", "-xf", "-"],
                                           stdin=subprocess.PIPE)
                    assert tar.stdin is not None
                    try:
                        for ref in source.export_template.options(**streaming_options()).remote(name):
                            chunk = ray.get(ref)
                            received += len(chunk)
                            tar.stdin.write(chunk)
                    finally:
                        tar.stdin.close()
                        code = tar.wait()
                    image = load_image(staging)
                    if code != 0 or image is None or store.template_key(image.name, image.digest) != key:
                        raise errors.TemplateBuildError(
                            f"template {name} from node {source!r} is not this node's build {key}", template=name)
                    os.replace(staging, target)
                except BaseException:
                    store.discard(staging)
                    raise
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, errors.MvmError):
                return _error(exc.cause)
            raise
        except errors.MvmError as exc:
            return _error(exc)
        return ("ok", {"template": name, "bytes": received, "already": False}, None)

    # ---- internals ------------------------------------------------------------------

    def _records(self) -> list[dict[str, Any]]:
        from ..supervisor.state import list_sandboxes

        records = list_sandboxes()
        for record in records:
            record["node_id"] = self.node_id
        return records

    def _record(self, sandbox_id: str) -> dict[str, Any]:
        record = self.locate(sandbox_id)
        if record is None:
            raise errors.SandboxNotFound(f"sandbox {sandbox_id} is not on node {self.node_id[:12]}")
        return record

    def _socket(self, sandbox_id: str) -> Path:
        from ..paths import sandboxes_dir
        from ..supervisor.state import CONTROL_SOCKET

        if not sandbox_id.startswith("sb-") or "/" in sandbox_id:
            raise errors.InvalidArgument("sandbox_id", f"{sandbox_id!r} is not a sandbox id", allowed="sb-<hex>")
        return sandboxes_dir() / sandbox_id / CONTROL_SOCKET

    def _client(self, sandbox_id: str, on_behalf_of: dict[str, str] | None = None) -> Any:
        """The shared connection to a sandbox's supervisor, one per principal a caller
        acts for (the supervisor audits the principal its connection's hello named)."""
        from ..supervisor.client import SupervisorClient

        key = (sandbox_id, json.dumps(on_behalf_of, sort_keys=True) if on_behalf_of else None)
        with self._clients_lock:
            client = self._clients.get(key)
            if client is None or client._closed:
                client = SupervisorClient(self._socket(sandbox_id), on_behalf_of=on_behalf_of)
                self._clients[key] = client
            return client

    def _forget_if_gone(self, sandbox_id: str, op: str) -> None:
        if op == "sandbox.destroy":
            directory.forget(sandbox_id)
            with self._clients_lock:
                gone = [key for key in self._clients if key[0] == sandbox_id]
                clients = [self._clients.pop(key) for key in gone]
            for client in clients:
                client.close()


class _Relay:
    """The ``data`` frames of one relayed request, between the thread that reads them from
    the supervisor and the Ray generator that hands them to the caller: at most
    ``STREAM_WINDOW`` bytes. ``put`` blocks while the window is full, and the supervisor
    client grants its request more only once ``put`` returned, so a caller that stops
    consuming stops the supervisor's sending (its other requests go on: they have threads
    of their own) and so the process: nothing piles up here. ``items`` hands out the
    frames in batches of at most ``GRANT_STEP`` bytes (or one larger frame), which Ray
    keeps at most ``ITEMS_IN_FLIGHT`` of unconsumed."""

    def __init__(self, op: str):
        self.op = op
        self._frames: deque[tuple[str, bytes]] = deque()
        self._buffered = 0
        self.peak = 0
        self._final: Reply | None = None
        self._left = False  # the generator ended (its caller left): put drops instead of waiting
        self._changed = threading.Condition()

    def put(self, stream: str, data: bytes) -> None:
        with self._changed:
            while self._buffered and self._buffered + len(data) > STREAM_WINDOW and not self._left:
                self._changed.wait()
            if self._left:
                return
            self._frames.append((stream, bytes(data)))
            self._buffered += len(data)
            self.peak = max(self.peak, self._buffered)
            self._changed.notify_all()

    def finish(self, reply: Reply) -> None:
        with self._changed:
            self._final = reply
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._left = True
            self._frames.clear()
            self._buffered = 0
            self._changed.notify_all()

    def items(self) -> Iterator[Reply]:
        while True:
            with self._changed:
                while not self._frames and self._final is None:
                    self._changed.wait()
                if not self._frames:
                    final = self._final
                    break
                frames = self._take()
                self._changed.notify_all()
            yield ("data", frames, None)  # (blocks while ITEMS_IN_FLIGHT are unconsumed)
        assert final is not None
        yield final

    def status(self) -> dict[str, Any]:
        return {"op": self.op, "buffered_bytes": self._buffered, "peak_bytes": self.peak}

    def _take(self) -> list[tuple[str, bytes]]:
        """The first frames, whole, up to ``GRANT_STEP`` bytes -- at least one (under the lock).
        A frame is a message (a ``sandbox.logs`` entry is one JSON line), never split or joined."""
        frames = [self._frames.popleft()]
        size = len(frames[0][1])
        while self._frames and size + len(self._frames[0][1]) <= GRANT_STEP:
            frames.append(self._frames.popleft())
            size += len(frames[-1][1])
        self._buffered -= size
        return frames


class _ChunkSink(io.RawIOBase):
    """A write-only file tarfile streams into; ``drain`` hands out whole chunks."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        return len(data)

    def drain(self, final: bool = False) -> Iterator[bytes]:
        while len(self._buffer) >= TRANSFER_CHUNK or (final and self._buffer):
            chunk = bytes(self._buffer[:TRANSFER_CHUNK])
            del self._buffer[:TRANSFER_CHUNK]
            yield chunk


def _templates_dir() -> Path:
    from ..paths import templates_dir

    return templates_dir()


def _current_digest(name: str) -> str:
    from ..templates.builder import current_digest
    from ..templates.catalog import recipe

    return current_digest(recipe(name))


def _current_build(name: str) -> Path | None:
    """The directory of this node's build of ``name`` with today's recipe and agent."""
    from ..templates import store
    from ..templates.builder import load_image

    directory = _templates_dir() / store.template_key(name, _current_digest(name))
    return directory if load_image(directory) is not None else None


def _snapshot_key() -> bytes:
    from ..snapshots import snapshot_key

    return snapshot_key()


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    return 0


def _mem_total_mb() -> int:
    return _meminfo("MemTotal")


def _mem_available_mb() -> int:
    return _meminfo("MemAvailable")


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
