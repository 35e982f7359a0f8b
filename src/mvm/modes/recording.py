"""Record and plan mode: ``RecordedSandbox`` and the process-wide recording.

In record/plan mode ``mvm.Sandbox.create(...)`` returns a :class:`RecordedSandbox`.
It offers the live ``Sandbox``'s surface; each call is validated exactly as the
live path validates it (the same SDK helpers) and appended, in order, to the
process's :class:`Recording`. Nothing boots and no sandbox state is created.

* ``commands.run`` returns ``CommandResult(recorded=True, exit_code=None, ...)``:
  no exit code is invented.
* ``commands.start`` returns a :class:`RecordedProcess` (``pid`` is ``None``).
* Reads (``files.read/list/stat/exists``, ``logs``, a process's output or exit
  code) raise :class:`~mvm.errors.NotAvailableInRecordMode` naming the call: a
  sandbox that never existed has nothing to read.
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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from .. import errors
from ..backends import backend_names
from ..spec import NetworkPolicy, Resources
from ..durations import parse_duration
from ..sdk import sandbox as _live
from ..protocol.requests import DEFAULT_MAX_OUTPUT_BYTES, check_run_limits
from ..sdk.commands import _SIGNALS
from ..sdk.files import absolute_path as _absolute
from ..sdk.includes import GUEST_ROOT, collect_includes
from ..sdk.models import CommandResult, FileEntry, LogEvent, ProcessInfo, SandboxInfo
from ..snapshots.model import Snapshot
from ..security.secrets import SecretRef

__all__ = [
    "RECORDED_MODES",
    "RECORDING_ENV",
    "RecordedCommands",
    "RecordedFiles",
    "RecordedProcess",
    "RecordedSandbox",
    "Recording",
    "current_recording",
    "encode_env",
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


def _not_available(call: str, mode: str, hint: str) -> NoReturn:
    raise errors.NotAvailableInRecordMode(
        f"{call} is not available in {mode} mode: nothing runs while a script is recorded, "
        f"so there is no sandbox to read from; {hint}", call=call, mode=mode)


def _recorded_mode() -> str:
    mode = os.environ.get("MVM_MODE")
    return mode if mode in RECORDED_MODES else "record"


def _check_mode_bits(mode: Any, field: str = "mode") -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise errors.InvalidArgument(field, f"{mode!r} is not a file mode", allowed="0..0o7777, e.g. 0o644")
    return mode


def _bytes_of(data: Any, field: str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise errors.InvalidArgument(field, f"{type(data).__name__} is not bytes or str")


# ---- the sandbox -----------------------------------------------------------------------


class RecordedSandbox:
    """What ``mvm.Sandbox.create`` returns in record/plan mode: same surface, nothing boots.

    >>> with mvm.Sandbox.create("python-3.13", mode="record") as sandbox:
    ...     sandbox.commands.run(["python", "-V"]).recorded
    True
    """

    recorded = True

    def __init__(self, recording: Recording, index: int, mode: str, spec: dict[str, Any]):
        self._recording = recording
        self._index = index
        self.mode = mode
        self._spec = spec
        self.id = f"recorded-{index + 1}"
        self.name = spec["name"] or _live._default_name(spec["workload_id"], f"sb-recorded-{index + 1}")
        self._state = "running"
        self._destroyed = False
        self._processes = 0
        self._snapshots = 0
        self.commands = RecordedCommands(self)
        self.files = RecordedFiles(self)
        self.ports = RecordedNetworkOps(self, "ports")
        self.network = RecordedNetworkOps(self, "network")

    def __repr__(self) -> str:
        return f"<RecordedSandbox {self.name} ({self.mode} mode)>"

    # ---- creation and discovery ----

    @classmethod
    def create(
        cls,
        template: str = "python-3.13",
        *,
        mode: str = "record",
        name: str | None = None,
        workload_id: str | None = None,
        ttl: str | int | float | None = _live.DEFAULT_TTL,
        include: Sequence[str] | None = None,
        resources: Resources | None = None,
        network: NetworkPolicy | None = None,
        env: Mapping[str, str | SecretRef] | None = None,
        backend: str | None = None,
        tags: Mapping[str, str] | None = None,
        from_snapshot: str | None = None,
    ) -> RecordedSandbox:
        """Validate like ``Sandbox.create`` and record the creation; nothing boots."""
        if mode not in RECORDED_MODES:
            raise errors.InvalidArgument("mode", f"{mode!r} is not a recording mode", allowed=list(RECORDED_MODES))
        from ..templates import check_template  # what ensure_template checks a name with, without building

        spec = _live._validated_spec(template, name=name, workload_id=workload_id, ttl=ttl, resources=resources,
                                     network=network, env=env, tags=tags, template_check=check_template)
        files = collect_includes(include or [], base_dir=_live.script_dir())
        if backend is not None and backend not in backend_names():
            raise errors.InvalidArgument("backend", f"unknown backend {backend!r}", allowed=backend_names())
        if from_snapshot is not None and (not isinstance(from_snapshot, str) or not from_snapshot.strip()):
            raise errors.InvalidArgument("from_snapshot", f"{from_snapshot!r} must be a snapshot id or name")
        recording = current_recording()
        by_path = {guest_path: (data, mode_bits) for guest_path, data, mode_bits in files}
        included = []
        for guest_path in sorted(by_path):
            data, mode_bits = by_path[guest_path]
            included.append({"path": guest_path[len(GUEST_ROOT) + 1:], "size": len(data),
                             "sha256": recording.store(data), "mode": mode_bits})
        resolved = spec["resources"]
        policy = spec["network"]
        index = recording.new_sandbox()
        recording.append({
            "op": "sandbox.create", "sandbox": index, "mode": mode, "at": _caller(),
            "template": template, "name": name, "workload_id": workload_id, "backend": backend,
            "resources": resolved.to_json(),
            "network": {"mode": policy.mode, "allow": list(policy.allow), "allow_wildcards": policy.allow_wildcards},
            "ttl_seconds": spec["ttl_seconds"], "tags": dict(tags or {}), "from_snapshot": from_snapshot,
            "env": encode_env(dict(env or {})),
            "include": {"guest_root": GUEST_ROOT, "paths": list(include or []), "files": included},
        })
        return cls(recording, index, mode, {**spec, "template": template, "workload_id": workload_id,
                                             "backend": backend, "tags": dict(tags or {})})

    @classmethod
    def connect(cls, name_or_id: str) -> NoReturn:
        _not_available("Sandbox.connect", _recorded_mode(), "a recording can only describe sandboxes the "
                       "script creates (connect to a running one in live mode)")

    @classmethod
    def list(cls) -> NoReturn:
        _not_available("Sandbox.list", _recorded_mode(), "list running sandboxes with `mvmctl ls`")

    # ---- plumbing ----

    def _record(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._destroyed:
            raise errors.InvalidState(f"sandbox {self.name} was destroyed", state="destroyed")
        return self._recording.append({"op": op, "sandbox": self._index, "at": _caller(), **fields})

    def _unavailable(self, call: str, hint: str) -> NoReturn:
        _not_available(call, self.mode, hint)

    # ---- information ----

    def describe(self) -> SandboxInfo:
        """What was asked for (state ``recorded``): the limits and policy, no backend facts."""
        resources = self._spec["resources"].to_json()
        policy = self._spec["network"]
        return SandboxInfo(
            id=self.id, name=self.name, state="destroyed" if self._destroyed else self._state,
            template=self._spec["template"], backend=self._spec["backend"] or "", isolation="",
            resources=resources,
            network={"mode": policy.mode, "allow": list(policy.allow), "allow_wildcards": policy.allow_wildcards},
            created_at=0.0, expires_at=None, workload_id=self._spec["workload_id"],
            details={"mode": self.mode, "recorded": True, "ttl_seconds": self._spec["ttl_seconds"],
                     "tags": self._spec["tags"]},
        )

    @property
    def state(self) -> str:
        return self.describe().state

    def logs(self, *, follow: bool = False, tail: int | None = None, since: float | None = None,
             redact: bool = True) -> Iterator[LogEvent]:
        self._unavailable("Sandbox.logs", "read logs of a live sandbox with `mvmctl logs NAME`")

    # ---- lifecycle ----

    def _transition(self, op: str, state: str, **fields: Any) -> SandboxInfo:
        self._record(op, **fields)
        self._state = state
        return self.describe()

    def stop(self) -> SandboxInfo:
        return self._transition("sandbox.stop", "stopped")

    def start(self) -> SandboxInfo:
        return self._transition("sandbox.start", "running")

    def pause(self) -> SandboxInfo:
        return self._transition("sandbox.pause", "paused")

    def resume(self, snapshot: str | Snapshot | None = None) -> SandboxInfo:
        ref: dict[str, Any] | None
        snap_id = snapshot.id if isinstance(snapshot, Snapshot) else snapshot
        if snap_id is None:
            ref = None
        elif not isinstance(snap_id, str) or not snap_id:
            raise errors.InvalidArgument("snapshot", f"{snapshot!r} is not a snapshot", allowed="a Snapshot or its id")
        elif snap_id.startswith(f"{self.id}-snapshot-"):
            ref = {"recorded": int(snap_id.rsplit("-", 1)[1]) - 1}
        else:
            ref = {"id": snap_id}
        return self._transition("sandbox.resume", "running", snapshot=ref)

    def snapshot(self, name: str | None = None, *, expires: str | int | None = None, keep: bool = False) -> Snapshot:
        expires_seconds = None if expires is None else parse_duration(expires, field="expires")
        if name is not None and (not isinstance(name, str) or not name):
            raise errors.InvalidArgument("name", f"{name!r} is not a snapshot name")
        index = self._snapshots
        self._record("sandbox.snapshot", name=name, expires_seconds=expires_seconds, keep=bool(keep),
                     snapshot=index)
        self._snapshots += 1
        return Snapshot(id=f"{self.id}-snapshot-{index + 1}", name=name or f"snapshot-{index + 1}",
                        sandbox_id=self.id, kind="recorded", created_at=0.0,
                        expires_at=None, size_bytes=0, keep=bool(keep))

    def destroy(self) -> None:
        """Recorded once; safe to call twice (like the live one)."""
        if self._destroyed:
            return
        self._record("sandbox.destroy")
        self._destroyed = True

    def kill(self) -> None:
        self.destroy()

    def close(self) -> None:
        """Nothing to disconnect from."""

    def __enter__(self) -> RecordedSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ---- commands --------------------------------------------------------------------------


class RecordedCommands:
    """``sandbox.commands`` in record/plan mode."""

    def __init__(self, sandbox: RecordedSandbox):
        self._sandbox = sandbox

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, Any] | None = None,
        cwd: str | None = None,
        timeout_seconds: float | None = 60,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        stdin: bytes | str | None = None,
        check: bool = False,
        on_stdout: Any = None,
        on_stderr: Any = None,
        redact: bool = True,
        auto_resume: bool = False,
    ) -> CommandResult:
        """Record the command; the result says ``recorded=True`` and has no exit code."""
        argv, env = _live.validate_command(argv, env, cwd)
        check_run_limits({"timeout_seconds": timeout_seconds, "max_output_bytes": max_output_bytes})
        payload = _bytes_of(stdin, "stdin") if stdin is not None else b""
        sb = self._sandbox
        stdin_sha = sb._recording.store(payload) if payload else None
        sb._record("commands.run", argv=argv, env=encode_env(env), cwd=cwd, timeout_seconds=timeout_seconds,
                   max_output_bytes=max_output_bytes, stdin_sha256=stdin_sha, check=bool(check),
                   auto_resume=bool(auto_resume))
        return CommandResult(exit_code=None, stdout="", stderr="", audit_id=None, duration_seconds=0.0,
                             recorded=True)

    def start(
        self,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, Any] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
        auto_resume: bool = False,
    ) -> RecordedProcess:
        """Record the start; returns a handle whose ``pid`` is ``None``."""
        argv, env = _live.validate_command(argv, env, cwd)
        sb = self._sandbox
        index = sb._processes
        sb._record("commands.start", argv=argv, env=encode_env(env), cwd=cwd, stdin=bool(stdin),
                   auto_resume=bool(auto_resume), process=index)
        sb._processes += 1
        return RecordedProcess(sb, index, argv, bool(stdin))

    def connect(self, pid: int) -> NoReturn:
        self._sandbox._unavailable("commands.connect", "a recorded sandbox has no running processes to attach to")

    def list(self) -> NoReturn:
        self._sandbox._unavailable("commands.list", "list processes of a live sandbox with `mvmctl proc ls NAME`")


class RecordedProcess:
    """A process ``commands.start`` recorded. Signals and stdin are recorded; anything that
    would need the real process (its exit code, output, info) raises ``NotAvailableInRecordMode``."""

    pid: int | None = None
    audit_id: str | None = None
    recorded = True

    def __init__(self, sandbox: RecordedSandbox, index: int, argv: list[str], stdin: bool):
        self._sandbox = sandbox
        self.index = index
        self.argv = argv
        self._stdin = stdin

    def __repr__(self) -> str:
        return f"<RecordedProcess #{self.index + 1} argv={self.argv!r}>"

    def _unavailable(self, call: str) -> NoReturn:
        self._sandbox._unavailable(f"Process.{call}", "a recorded process never ran, so it has no exit code "
                                   "or output (use commands.run in live mode, or `mvmctl proc` on a live sandbox)")

    def wait(self, timeout: float | None = None) -> int:
        self._unavailable("wait")

    @property
    def exit_code(self) -> int | None:
        self._unavailable("exit_code")

    def is_running(self) -> bool:
        self._unavailable("is_running")

    def info(self) -> ProcessInfo:
        self._unavailable("info")

    def output(self, *, replay: bool = True) -> Iterator[tuple[str, str]]:
        self._unavailable("output")

    @property
    def stdout(self) -> Iterator[str]:
        self._unavailable("stdout")

    @property
    def stderr(self) -> Iterator[str]:
        self._unavailable("stderr")

    def signal(self, sig: str | int = "TERM", *, group: bool = True) -> None:
        if isinstance(sig, str) and sig.upper().removeprefix("SIG") not in _SIGNALS:
            raise errors.InvalidArgument("signal", f"unknown signal {sig!r}", allowed=sorted(_SIGNALS))
        if not isinstance(sig, str) and (isinstance(sig, bool) or not isinstance(sig, int) or not 0 < sig < 65):
            raise errors.InvalidArgument("signal", f"{sig!r} is not a signal", allowed=sorted(_SIGNALS))
        name: str | int = sig.upper().removeprefix("SIG") if isinstance(sig, str) else int(sig)
        self._sandbox._record("process.signal", process=self.index, signal=name, group=bool(group))

    def kill(self) -> None:
        self.signal("KILL")

    def send_stdin(self, data: bytes | str) -> None:
        if not self._stdin:
            raise errors.InvalidState("the process was not started with stdin=True", state="no-stdin")
        raw = _bytes_of(data, "data")
        sb = self._sandbox
        sb._record("process.stdin", process=self.index, sha256=sb._recording.store(raw), size=len(raw))

    def close_stdin(self) -> None:
        if not self._stdin:
            raise errors.InvalidState("the process was not started with stdin=True", state="no-stdin")
        self._sandbox._record("process.close_stdin", process=self.index)


# ---- files -----------------------------------------------------------------------------


class RecordedFiles:
    """``sandbox.files`` in record/plan mode: writes are recorded, reads raise."""

    _READ_HINT = "a recorded sandbox has no files yet (read them from a live sandbox, e.g. `mvmctl fs read`)"

    def __init__(self, sandbox: RecordedSandbox):
        self._sandbox = sandbox

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True) -> FileEntry:
        path = _absolute(path)
        raw = _bytes_of(data, "data")
        _check_mode_bits(mode)
        sb = self._sandbox
        digest = sb._recording.store(raw)
        sb._record("files.write", path=path, sha256=digest, size=len(raw), mode=mode, make_parents=bool(make_parents))
        return FileEntry(name=path.rstrip("/").rsplit("/", 1)[-1], path=path, type="file", size=len(raw),
                         mode=mode, mtime=0.0)

    def read(self, path: str, *, max_bytes: int = 0) -> bytes:
        _absolute(path)
        self._sandbox._unavailable("files.read", self._READ_HINT)

    def read_text(self, path: str, *, encoding: str = "utf-8", max_bytes: int = 0) -> str:
        _absolute(path)
        self._sandbox._unavailable("files.read_text", self._READ_HINT)

    def list(self, path: str = "/") -> list[FileEntry]:
        _absolute(path)
        self._sandbox._unavailable("files.list", "a recorded sandbox has no files yet (`mvmctl fs ls` on a live one)")

    def stat(self, path: str) -> FileEntry:
        _absolute(path)
        self._sandbox._unavailable("files.stat", "a recorded sandbox has no files yet (`mvmctl fs stat` on a live one)")

    def exists(self, path: str) -> bool:
        _absolute(path)
        self._sandbox._unavailable("files.exists",
                                   "a recorded sandbox has no files yet (`mvmctl fs stat` on a live one)")

    def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        path = _absolute(path)
        _check_mode_bits(mode)
        self._sandbox._record("files.mkdir", path=path, parents=bool(parents), mode=mode)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._sandbox._record("files.remove", path=_absolute(path), recursive=bool(recursive))

    def move(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        self._sandbox._record("files.move", src=_absolute(src), dst=_absolute(dst), overwrite=bool(overwrite))


class RecordedNetworkOps:
    """``sandbox.ports`` / ``sandbox.network`` in record/plan mode: a forward or a policy
    change needs a running sandbox, so each call says so (the policy given to
    ``Sandbox.create`` is part of the recording already)."""

    _HINT = ("port forwards and policy updates act on a running sandbox: use them in live mode "
             "(mvmctl run --mode live), or `mvmctl port forward` / `mvmctl network update` on a live one")

    def __init__(self, sandbox: RecordedSandbox, name: str):
        self._sandbox = sandbox
        self._name = name

    def __getattr__(self, call: str) -> Any:
        if call.startswith("_"):
            raise AttributeError(call)

        def unavailable(*args: Any, **kwargs: Any) -> NoReturn:
            self._sandbox._unavailable(f"{self._name}.{call}", self._HINT)

        return unavailable
