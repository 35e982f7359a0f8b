"""Record and plan mode: the record transport and the process-wide recording.

In record/plan mode ``mvm.Sandbox.create(...)`` (and ``mvm.AsyncSandbox.create``)
returns the same class as in live mode, talking to a :class:`RecordTransport`
instead of a supervisor: the mode only picks the transport (:mod:`mvm.sdk.transport`).
The SDK builds and checks its wire requests exactly as it does live; the record
transport checks what the supervisor would check, appends each request, in order and
in the IR's vocabulary, to the process's :class:`Recording`, and answers with a
recorded result. Nothing boots and no sandbox state is created.

* ``commands.run`` returns ``CommandResult(recorded=True, exit_code=None, ...)``:
  no exit code is invented.
* ``commands.start`` returns a ``Process`` whose ``pid`` is ``None`` (``recorded``).
* Reads (``files.read/list/stat/exists``, ``logs``, a process's output or exit
  code, port forwards) raise :class:`~mvm.errors.NotAvailableInRecordMode` naming
  the SDK call: a sandbox that never existed has nothing to read.
* Secret references are recorded by name only; their values are never looked up.

Events are plain JSON objects, already in the IR's operation vocabulary
(:data:`mvm.modes.ir.OPERATIONS`) plus ``sandbox`` (index), ``seq`` and ``at``
(the script's ``file:line``). Written bytes are stored once, by sha256. When
``$MVM_RECORDING`` names a file (``mvmctl compile``/``run`` set it for the script),
each event is appended to it as a JSON line and bytes go to ``<file>.blobs/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from .. import errors
from ..errors import shown
from ..durations import parse_duration
from ..protocol.requests import check_run_limits
from ..sdk.commands import STDIN_STAGING_DIR
from ..sdk.files import absolute_path
from ..sdk.includes import GUEST_ROOT
from ..security.secrets import SecretRef
from ..supervisor.client_core import Request, all_answered

if TYPE_CHECKING:
    from ..sdk.sandbox import CreateRequest

__all__ = [
    "RECORDED_MODES",
    "RECORDING_ENV",
    "AsyncRecordTransport",
    "RecordTransport",
    "Recording",
    "current_recording",
    "encode_env",
    "not_available",
    "reset_recording",
]

#: The file ``mvmctl`` tells a recorded script to append its events to.
RECORDING_ENV = "MVM_RECORDING"
RECORDED_MODES = ("record", "plan")

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep


# ---- the recording ---------------------------------------------------------------------


class Recording:
    """The ordered calls of one process (every sandbox it created), and the bytes written.

    ``Recording()`` keeps everything in memory; ``Recording(path)`` also appends each
    event to ``path`` (JSON lines) and stores bytes under ``path + ".blobs"``, so the
    ``mvmctl`` process that started the script can read them with :meth:`load`.
    """

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else None
        self.events: list[dict[str, Any]] = []
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._sandboxes = 0
        if self.path is not None:
            self.blob_dir.mkdir(parents=True, exist_ok=True)

    @property
    def blob_dir(self) -> Path:
        if self.path is None:
            raise ValueError("an in-memory recording has no blob directory")
        return self.path.with_name(self.path.name + ".blobs")

    def __repr__(self) -> str:
        return f"<Recording {len(self.events)} events, {self._sandboxes} sandboxes>"

    # -- writing --

    def new_sandbox(self) -> int:
        with self._lock:
            self._sandboxes += 1
            return self._sandboxes - 1

    def store(self, data: bytes) -> str:
        """Keep ``data`` (content-addressed); returns its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if self.path is None:
                self._blobs.setdefault(digest, bytes(data))
            else:
                target = self.blob_dir / digest
                if not target.exists():
                    tmp = target.with_name(f".{digest}.{os.getpid()}.tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
        return digest

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            event = {"seq": len(self.events), **event}
            self.events.append(event)
            if self.path is not None:
                line = json.dumps(event, sort_keys=True, separators=(",", ":")) + "\n"
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
        return event

    # -- reading --

    def blob(self, digest: str) -> bytes:
        if self.path is None:
            return self._blobs[digest]
        return (self.blob_dir / digest).read_bytes()

    def sandbox_indexes(self) -> list[int]:
        return [e["sandbox"] for e in self.events if e.get("op") == "sandbox.create"]

    def events_of(self, index: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("sandbox") == index]

    def script_outcome(self) -> dict[str, Any] | None:
        """The ``script.error`` / ``script.exit`` event the runner's child wrote, if any."""
        event: dict[str, Any]  # mypy infers Any from reversed() over a list of dicts of Any
        for event in reversed(self.events):
            if event.get("op") in ("script.error", "script.exit"):
                return event
        return None

    @classmethod
    def load(cls, path: Path | str) -> Recording:
        """Read a recording another process wrote with ``Recording(path)``."""
        rec = cls.__new__(cls)
        rec.path = Path(path)
        rec._blobs = {}
        rec._lock = threading.RLock()
        rec.events = []
        try:
            text = rec.path.read_text()
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            if line.strip():
                rec.events.append(json.loads(line))
        rec._sandboxes = len(rec.sandbox_indexes())
        return rec


_current: Recording | None = None
_current_lock = threading.Lock()


def current_recording() -> Recording:
    """The process-wide recording (to ``$MVM_RECORDING`` when set, else in memory)."""
    global _current
    with _current_lock:
        wanted = os.environ.get(RECORDING_ENV) or None
        have = str(_current.path) if _current is not None and _current.path is not None else None
        if _current is None or have != wanted:
            _current = Recording(wanted)
        return _current


def reset_recording() -> Recording:
    """Start a fresh process-wide recording (tests, or a long-lived process recording twice)."""
    global _current
    with _current_lock:
        _current = None
    return current_recording()


# ---- helpers ---------------------------------------------------------------------------


def encode_env(env: Mapping[str, str | SecretRef]) -> dict[str, dict[str, str]]:
    """The IR form of an env mapping: literal values, or secret references by name only."""
    out: dict[str, dict[str, str]] = {}
    for key in sorted(env):
        value = env[key]
        if isinstance(value, SecretRef):
            out[key] = {"kind": "secret_ref", "name": value.name}
        else:
            out[key] = {"kind": "literal", "value": value}
    return out


def _caller() -> str | None:
    """``file:line`` of the first frame outside mvm: the script's line that made the call."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE_DIR) and not filename.startswith("<"):
            return f"{os.path.basename(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


_SDK_DIR = _PACKAGE_DIR + "sdk" + os.sep
#: SDK classes a script reaches as attributes (``sandbox.files``...), and the async twins
#: named as their sync class, so an error names the call the same way in both.
_CALL_OWNERS = {
    "Commands": "commands", "Files": "files", "Ports": "ports", "Network": "network",
    "AsyncCommands": "commands", "AsyncFiles": "files", "AsyncPorts": "ports", "AsyncNetwork": "network",
    "AsyncSandbox": "Sandbox", "AsyncProcess": "Process",
}


def public_call() -> str:
    """The SDK call the script made (``files.read_text``, ``Process.exit_code``, ...): the
    outermost ``mvm.sdk`` frame below the script's own (coroutine frames chain the same way)."""
    frame: FrameType | None = sys._getframe(1)
    name = "Sandbox"
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_SDK_DIR):
            owner, _, method = frame.f_code.co_qualname.rpartition(".")
            name = f"{_CALL_OWNERS.get(owner, owner)}.{method}"
        elif not filename.startswith(_PACKAGE_DIR) and not filename.startswith("<"):
            break
        frame = frame.f_back
    return name


def not_available(call: str, mode: str, hint: str) -> NoReturn:
    raise errors.NotAvailableInRecordMode(
        f"{call} is not available in {mode} mode: nothing runs while a script is recorded, "
        f"so there is no sandbox to read from; {hint}", call=call, mode=mode)


def _check_mode_bits(mode: Any, field: str = "mode") -> int:
    """What the guest agent accepts as a file mode (it refuses the rest the same way)."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise errors.InvalidArgument(field, f"{shown(mode)} is not a file mode", allowed="0..0o7777, e.g. 0o644")
    return mode


def _ir_env(args: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """A command request's env in IR form: its literals, and its secrets by name
    (a recorded request never carries secret values: ``secret_names`` maps key -> name)."""
    names = dict(args.get("secret_names") or {})
    env: dict[str, str | SecretRef] = {k: v for k, v in (args.get("env") or {}).items() if k not in names}
    env.update({key: SecretRef(name) for key, name in names.items()})
    return encode_env(env)


# ---- the record transport --------------------------------------------------------------

_FILES_HINT = "a recorded sandbox has no files yet (read them from a live sandbox, e.g. `mvmctl fs read`)"
_PROCESS_HINT = ("a recorded process never ran, so it has no exit code or output (use commands.run in live "
                 "mode, or `mvmctl proc` on a live sandbox)")
_NETWORK_HINT = ("port forwards and policy updates act on a running sandbox: use them in live mode "
                 "(mvmctl run --mode live), or `mvmctl port forward` / `mvmctl network update` on a live one")
#: Ops that need a live answer, with the hint of their NotAvailableInRecordMode error.
_UNAVAILABLE = {
    "fs.read": _FILES_HINT,
    "fs.list": "a recorded sandbox has no files yet (`mvmctl fs ls` on a live one)",
    "fs.stat": "a recorded sandbox has no files yet (`mvmctl fs stat` on a live one)",
    "sandbox.logs": "read logs of a live sandbox with `mvmctl logs NAME`",
    "proc.list": "list processes of a live sandbox with `mvmctl proc ls NAME`",
    "proc.wait": _PROCESS_HINT,
    "proc.attach": _PROCESS_HINT,
    "port.forward": _NETWORK_HINT,
    "port.list": _NETWORK_HINT,
    "port.close": _NETWORK_HINT,
    "network.update": _NETWORK_HINT,
}
_NO_PROCESSES_HINT = "a recorded sandbox has no running processes to attach to"


class RecordTransport:
    """The transport of a sandbox created in record/plan mode (see :mod:`mvm.sdk.transport`).

    ``Sandbox``, ``Commands``, ``Files`` and ``Process`` send it the wire requests they
    send a live supervisor. It checks what the supervisor would check, appends each
    request to the recording in the IR's vocabulary, and answers like the supervisor
    with recorded results (``recorded: true``, no exit code, no pid: a started process
    is named by its index, ``{"process": i}``). A request that needs a live answer
    raises :class:`~mvm.errors.NotAvailableInRecordMode` naming the SDK call.
    """

    def __init__(self, recording: Recording, index: int, mode: str, describe: dict[str, Any]):
        self.recording = recording
        self.index = index
        self.mode = mode
        self.sandbox_id: str = describe["id"]
        self.name: str = describe["name"]
        self._describe = describe
        self._processes: list[bool] = []  # per recorded process: started with stdin=True
        self._snapshots = 0
        self._writes: dict[str, tuple[dict[str, Any], bytearray]] = {}  # handle -> chunked fs.write
        self._staged: dict[str, bytes] = {}  # a run's stdin staged as a guest file: it is the run's stdin
        self._destroyed = False

    @classmethod
    def open(cls, mode: str, request: CreateRequest, default_name: Callable[[str], str]) -> RecordTransport:
        """Record ``request`` as a ``sandbox.create`` (included files stored by sha256)."""
        if mode not in RECORDED_MODES:
            raise errors.InvalidArgument("mode", f"{shown(mode)} is not a recording mode", allowed=list(RECORDED_MODES))
        recording = current_recording()
        by_path = {guest_path: (data, mode_bits) for guest_path, data, mode_bits in request.files}
        included = []
        for guest_path in sorted(by_path):
            data, mode_bits = by_path[guest_path]
            included.append({"path": guest_path[len(GUEST_ROOT) + 1:], "size": len(data),
                             "sha256": recording.store(data), "mode": mode_bits})
        index = recording.new_sandbox()
        recording.append({
            "op": "sandbox.create", "sandbox": index, "mode": mode, "at": _caller(),
            "template": request.template, "name": request.name, "workload_id": request.workload_id,
            "backend": request.backend, "resources": request.resources.to_json(),
            "network": request.network.to_json(), "ttl_seconds": request.ttl_seconds, "tags": dict(request.tags),
            "from_snapshot": request.from_snapshot, "env": encode_env(dict(request.env)),
            "include": {"guest_root": GUEST_ROOT, "paths": list(request.include), "files": included},
            "auto_pause_seconds": request.auto_pause_seconds, "on_behalf_of": request.on_behalf_of,
        })
        sandbox_id = f"recorded-{index + 1}"
        describe = {
            "id": sandbox_id, "name": request.name or default_name(f"sb-{sandbox_id}"), "state": "running",
            "template": request.template, "backend": request.backend or "", "isolation": "",
            "resources": request.resources.to_json(), "network": request.network.to_json(),
            "created_at": 0.0, "expires_at": None, "workload_id": request.workload_id,
            "details": {"mode": mode, "recorded": True, "ttl_seconds": request.ttl_seconds,
                        "tags": dict(request.tags), "auto_pause_seconds": request.auto_pause_seconds},
        }
        return cls(recording, index, mode, describe)

    def __repr__(self) -> str:
        return f"<RecordTransport {self.name} ({self.mode} mode)>"

    # ---- the Transport shape ----

    def call(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"", *,
             on_data: Callable[[str, bytes], None] | None = None,
             timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        args = dict(args or {})
        if op in _UNAVAILABLE:
            not_available(public_call(), self.mode, _UNAVAILABLE[op])
        if op == "proc.info":  # a recorded process has no info; commands.connect(pid) has nothing to attach to
            not_available(public_call(), self.mode, _PROCESS_HINT if "process" in args else _NO_PROCESSES_HINT)
        if op == "sandbox.describe":
            return self._info(), b""
        if self._destroyed:
            raise errors.InvalidState(f"sandbox {self.name} was destroyed", state="destroyed")
        handler = getattr(self, "_" + op.replace(".", "_"), None)
        if handler is None:
            raise errors.UnknownOp(f"{op} cannot be recorded")
        result: dict[str, Any] = handler(args, payload)
        return result, b""

    def call_many(self, requests: Sequence[Request]) -> list[tuple[dict[str, Any], bytes]]:
        """Each request recorded in turn (a recording waits on nothing)."""
        outcomes: list[tuple[dict[str, Any], bytes] | errors.MvmError] = []
        for op, args, payload in requests:
            try:
                outcomes.append(self.call(op, args, payload))
            except errors.MvmError as exc:
                outcomes.append(exc)
        return all_answered(outcomes)

    def stream(self, op: str, args: dict[str, Any] | None = None, *,
               idle_timeout: float | None = None) -> Iterator[tuple[str, bytes]]:
        not_available(public_call(), self.mode, _UNAVAILABLE.get(op, _PROCESS_HINT))

    def close(self) -> None:
        """Nothing to disconnect from."""

    # ---- ops (``_`` + the op name with dots as underscores) ----

    def _record(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.recording.append({"op": op, "sandbox": self.index, "at": _caller(), **fields})

    def _info(self) -> dict[str, Any]:
        return {**self._describe, "state": "destroyed" if self._destroyed else self._describe["state"]}

    def _transition(self, op: str, state: str, **fields: Any) -> dict[str, Any]:
        self._record(op, **fields)
        self._describe["state"] = state
        return self._info()

    def _exec_run(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._refuse_user(args)
        check_run_limits(args)
        stdin = self._staged.pop(args["stdin_path"]) if args.get("stdin_path") in self._staged else payload
        self._record("commands.run", argv=args["argv"], env=_ir_env(args), cwd=args.get("cwd"),
                     timeout_seconds=args.get("timeout_seconds"), max_output_bytes=args.get("max_output_bytes"),
                     stdin_sha256=self.recording.store(stdin) if stdin else None, check=bool(args.get("check")),
                     auto_resume=bool(args.get("auto_resume")))
        return {"recorded": True, "exit_code": None, "duration_seconds": 0.0, "pid": None}

    def _proc_start(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._refuse_user(args)
        index = len(self._processes)
        self._record("commands.start", argv=args["argv"], env=_ir_env(args), cwd=args.get("cwd"),
                     stdin=bool(args.get("stdin")), auto_resume=bool(args.get("auto_resume")), process=index)
        self._processes.append(bool(args.get("stdin")))
        return {"recorded": True, "pid": None, "process": index}

    def _refuse_user(self, args: dict[str, Any]) -> None:
        if args.get("user") is not None:  # workload-v1 has no field for it: recording would drop it
            not_available(public_call(), self.mode, "the workload IR has no user field; act as another "
                          "user in live mode")

    def _process(self, args: dict[str, Any]) -> int:
        index = args.get("process")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._processes):
            raise errors.InvalidArgument("process", f"{shown(index)} is not a process this recording started")
        return index

    def _proc_signal(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        index = self._process(args)
        self._record("process.signal", process=index, signal=args["signal"], group=bool(args.get("group", True)))
        return {}

    def _proc_stdin(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        index = self._process(args)
        if not self._processes[index]:
            raise errors.InvalidState("the process was not started with stdin=True", state="no-stdin")
        if args.get("eof"):
            self._record("process.close_stdin", process=index)
        else:
            self._record("process.stdin", process=index, sha256=self.recording.store(payload), size=len(payload))
        return {}

    def _fs_write(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._refuse_user(args)
        path = absolute_path(args.get("path"))  # type: ignore[arg-type]
        mode = _check_mode_bits(args.get("mode", 0o644))
        if path.startswith(STDIN_STAGING_DIR + "/"):  # the SDK stages a large run stdin: it is the run's stdin
            self._staged[path] = payload
        else:
            self._record("files.write", path=path, sha256=self.recording.store(payload), size=len(payload),
                         mode=mode, make_parents=bool(args.get("make_parents", True)))
        entry = {"name": path.rstrip("/").rsplit("/", 1)[-1], "path": path, "type": "file", "size": len(payload),
                 "mode": mode, "mtime": 0.0}
        return {"recorded": True, "size": len(payload), "entry": entry}

    def _fs_write_begin(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._refuse_user(args)
        absolute_path(args.get("path"))  # type: ignore[arg-type]
        _check_mode_bits(args.get("mode", 0o644))
        handle = f"w{len(self._writes) + 1}"
        self._writes[handle] = (args, bytearray())
        return {"handle": handle}

    def _fs_write_chunk(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        # appended: a window is recorded in turn, so each chunk's ``offset`` is where the bytes so far end
        self._writes[args["handle"]][1].extend(payload)
        return {}

    def _fs_write_end(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        begun, data = self._writes.pop(args["handle"])
        if not args.get("commit"):
            return {"committed": False}
        return {**self._fs_write(begun, bytes(data)), "committed": True}

    def _fs_mkdir(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._refuse_user(args)
        path = absolute_path(args.get("path"))  # type: ignore[arg-type]
        self._record("files.mkdir", path=path, parents=bool(args.get("parents", True)),
                     mode=_check_mode_bits(args.get("mode", 0o755)))
        return {}

    def _fs_remove(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._refuse_user(args)
        path = absolute_path(args.get("path"))  # type: ignore[arg-type]
        if self._staged.pop(path, None) is None:  # a staged stdin whose run was refused is simply dropped
            self._record("files.remove", path=path, recursive=bool(args.get("recursive")))
        return {}

    def _fs_move(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._refuse_user(args)
        self._record("files.move", src=args["src"], dst=args["dst"], overwrite=bool(args.get("overwrite")))
        return {}

    def _sandbox_stop(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        return self._transition("sandbox.stop", "stopped")

    def _sandbox_start(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        return self._transition("sandbox.start", "running")

    def _sandbox_pause(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        return self._transition("sandbox.pause", "paused")

    def _sandbox_resume(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        snap_id = args.get("snapshot")
        ref: dict[str, Any] | None
        if snap_id is None:
            ref = None
        elif not isinstance(snap_id, str) or not snap_id:
            raise errors.InvalidArgument("snapshot", f"{shown(snap_id)} is not a snapshot",
                                         allowed="a Snapshot or its id")
        elif snap_id.startswith(f"{self.sandbox_id}-snapshot-"):
            ref = {"recorded": int(snap_id.rsplit("-", 1)[1]) - 1}
        else:
            ref = {"id": snap_id}
        return self._transition("sandbox.resume", "running", snapshot=ref)

    def _sandbox_snapshot(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        name, expires, keep = args.get("name"), args.get("expires"), bool(args.get("keep"))
        expires_seconds = None if expires is None else parse_duration(expires, field="expires")
        if name is not None and (not isinstance(name, str) or not name):
            raise errors.InvalidArgument("name", f"{shown(name)} is not a snapshot name")
        index = self._snapshots
        self._record("sandbox.snapshot", name=name, expires_seconds=expires_seconds, keep=keep, snapshot=index)
        self._snapshots += 1
        return {"id": f"{self.sandbox_id}-snapshot-{index + 1}", "name": name or f"snapshot-{index + 1}",
                "sandbox_id": self.sandbox_id, "kind": "recorded", "created_at": 0.0, "expires_at": None,
                "size_bytes": 0, "keep": keep}

    def _sandbox_destroy(self, args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._record("sandbox.destroy")
        self._destroyed = True
        return {}


class AsyncRecordTransport:
    """:class:`RecordTransport` awaited (``AsyncSandbox`` in record/plan mode). Recording
    never waits on anything, so each call runs inline: the order of the recording is
    the order in which the script's tasks made their calls."""

    def __init__(self, transport: RecordTransport):
        self.transport = transport

    def __repr__(self) -> str:
        return f"<AsyncRecordTransport {self.transport.name} ({self.transport.mode} mode)>"

    async def call(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"", *,
                   on_data: Callable[[str, bytes], None] | None = None,
                   timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        return self.transport.call(op, args, payload, on_data=on_data, timeout=timeout)

    async def call_many(self, requests: Sequence[Request]) -> list[tuple[dict[str, Any], bytes]]:
        return self.transport.call_many(requests)

    async def stream(self, op: str, args: dict[str, Any] | None = None, *,
                     idle_timeout: float | None = None) -> AsyncIterator[tuple[str, bytes]]:
        for item in self.transport.stream(op, args):  # raises NotAvailableInRecordMode
            yield item

    async def aclose(self) -> None:
        """Nothing to disconnect from."""
