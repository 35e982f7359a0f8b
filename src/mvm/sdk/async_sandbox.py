"""``mvm.AsyncSandbox``: the ``Sandbox`` surface for asyncio programs.

Every per-sandbox operation is native asyncio over ``AsyncSupervisorClient`` (one
connection per handle, shared by all tasks). Requests are built and answers parsed by
the same functions the sync SDK uses (``sdk.commands``, ``sdk.files``, ``sdk.network``,
``sdk.sandbox``), so both check arguments and shape results alike.

``create`` runs the blocking launch path (template build on first use, supervisor spawn,
agent handshake) in a worker thread (``asyncio.to_thread``); ``list`` and ``connect``'s
lookup read the state directory there too. In record/plan mode ``create`` records like
``Sandbox.create`` (inline: nothing blocks) and the handle's transport is the recording
(:class:`mvm.modes.recording.AsyncRecordTransport`), so an async script compiles to the
same IR as its sync twin.

Cancellation: cancelling a task awaiting ``commands.run`` sends the request's ``cancel``
frame; the supervisor kills the process's whole group and the call ends with
``CancelledError`` in the task. Cancelling a reader of ``process.output()`` or ``logs()``
ends only the stream, not the process.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import errors
from ..backends.base import NetworkPolicy, Resources
from ..protocol import CHUNK_SIZE
from ..protocol.requests import DEFAULT_MAX_READ_BYTES
from ..security.secrets import Redactor, SecretRef
from ..supervisor.async_client import AsyncSupervisorClient
from ..supervisor.state import CONTROL_SOCKET, find_sandbox
from .commands import (
    DEFAULT_MAX_OUTPUT_BYTES,
    LineSplitter,
    OutputCallback,
    OutputCapture,
    ProcessHandle,
    StreamDecoder,
    run_options,
    signal_args,
    started_process,
    stdin_payload,
)
from ..snapshots.model import Snapshot
from .files import absolute_path, as_user, chunk_windows, gather_into, payload_bytes, read_request, written_entry
from .models import CommandResult, FileEntry, LogEvent, PortForward, ProcessInfo, SandboxInfo
from .network import close_args, forward_args, update_args
from ..spec import DEFAULT_TEMPLATE, DEFAULT_TTL
from .sandbox import (
    Sandbox,
    command_args,
    current_mode,
    live_only,
    log_event,
    resume_args,
    snapshot_args,
)
from .transport import AsyncTransport


class AsyncSandbox:
    """A live sandbox driven from asyncio.

    >>> async with await mvm.AsyncSandbox.create("python-3.13") as sandbox:
    ...     results = await asyncio.gather(*(sandbox.commands.run(["echo", str(i)]) for i in range(50)))
    """

    def __init__(
        self,
        sandbox_id: str,
        name: str,
        directory: Path,
        *,
        secret_values: dict[str, str] | None = None,
        on_behalf_of: dict[str, str] | None = None,
        connect: Callable[[], Awaitable[AsyncTransport]] | None = None,
        mode: str = "live",
    ):
        self.id = sandbox_id
        self.name = name
        self.mode = mode
        self._directory = directory
        self._secret_values = dict(secret_values or {})
        self._conn: AsyncTransport | None = None
        # How to reach the supervisor: its local socket, or (record/plan mode) the recording.
        self._connect = connect or self._open_supervisor
        self._on_behalf_of = on_behalf_of
        self._connecting = asyncio.Lock()
        self._killed = False
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.ports = AsyncPorts(self)
        self.network = AsyncNetwork(self)

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.name} ({self.id})>"

    # ---- creation and discovery ----------------------------------------------

    @classmethod
    async def create(
        cls,
        template: str = DEFAULT_TEMPLATE,
        *,
        name: str | None = None,
        workload_id: str | None = None,
        ttl: str | int | float | None = DEFAULT_TTL,
        include: Sequence[str] | None = None,
        resources: Resources | None = None,
        network: NetworkPolicy | None = None,
        env: Mapping[str, str | SecretRef] | None = None,
        backend: str | None = None,
        tags: Mapping[str, str] | None = None,
        from_snapshot: str | None = None,
        on_behalf_of: Mapping[str, str] | None = None,
        auto_pause: str | int | float | None = None,
    ) -> AsyncSandbox:
        """Create a sandbox (arguments as ``Sandbox.create``). The launch path blocks,
        so it runs in a worker thread; the returned handle is native asyncio."""
        mode = current_mode()
        if mode != "live":  # recorded inline (nothing blocks), by the one create path; same IR as sync
            from ..modes.recording import AsyncRecordTransport, RecordTransport

            recorded = Sandbox.create(
                template, name=name, workload_id=workload_id, ttl=ttl, include=include, resources=resources,
                network=network, env=env, backend=backend, mode=mode, tags=tags, from_snapshot=from_snapshot,
                on_behalf_of=on_behalf_of, auto_pause=auto_pause,
            )
            recording = recorded._client()
            assert isinstance(recording, RecordTransport)
            transport = AsyncRecordTransport(recording)

            async def connect() -> AsyncTransport:
                return transport

            return cls(recorded.id, recorded.name, recorded._directory, connect=connect, mode=mode)
        sync = await asyncio.to_thread(
            Sandbox.create, template, name=name, workload_id=workload_id, ttl=ttl, include=include,
            resources=resources, network=network, env=env, backend=backend, mode="live", tags=tags,
            from_snapshot=from_snapshot, on_behalf_of=on_behalf_of, auto_pause=auto_pause,
        )
        sync.close()
        principal = dict(on_behalf_of) if on_behalf_of else None  # checked by Sandbox.create
        return cls(sync.id, sync.name, sync._directory, secret_values=sync._secret_values, on_behalf_of=principal)

    @classmethod
    async def connect(cls, name_or_id: str) -> AsyncSandbox:
        """Attach to a running sandbox by name or id (``SandboxLost`` if its supervisor died)."""
        live_only("Sandbox.connect", "a recording can only describe sandboxes the script creates "
                  "(connect to a running one in live mode)")
        directory, record = await asyncio.to_thread(find_sandbox, name_or_id)
        sandbox = cls(record["id"], record["name"], directory)
        await sandbox._client()  # a dead supervisor raises SandboxNotFound here, as in Sandbox.connect's first call
        return sandbox

    @classmethod
    async def list(cls) -> list[SandboxInfo]:
        """Every sandbox on this host, ``lost`` ones too (``Sandbox.list`` in a worker thread)."""
        live_only("Sandbox.list", "list running sandboxes with `mvmctl ls`")
        return await asyncio.to_thread(Sandbox.list)

    # ---- plumbing ----------------------------------------------------------------

    @property
    def recorded(self) -> bool:
        """True in record/plan mode: calls are recorded, nothing runs."""
        return self.mode != "live"

    async def _open_supervisor(self) -> AsyncTransport:
        return await AsyncSupervisorClient.open(self._directory / CONTROL_SOCKET, on_behalf_of=self._on_behalf_of)

    async def _client(self) -> AsyncTransport:
        if self._killed:
            raise errors.InvalidState(f"sandbox {self.name} was destroyed", state="destroyed")
        if self._conn is None:
            async with self._connecting:
                if self._conn is None:
                    self._conn = await self._connect()
        return self._conn

    def _secrets(self) -> dict[str, str] | None:
        """Where resolved secret values go (``None`` in record/plan mode: never resolved)."""
        return None if self.recorded else self._secret_values

    async def _call(
        self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"", **kwargs: Any
    ) -> tuple[dict[str, Any], bytes]:
        return await (await self._client()).call(op, args, payload, **kwargs)

    def _redactor(self, text: str) -> str:
        return Redactor(self._secret_values).redact(text) if self._secret_values else text

    # ---- information ---------------------------------------------------------------

    async def describe(self) -> SandboxInfo:
        return SandboxInfo.from_wire((await self._call("sandbox.describe"))[0])

    async def state(self) -> str:
        return (await self.describe()).state

    async def logs(
        self,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        redact: bool = True,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[LogEvent]:
        """``async for event in sandbox.logs(follow=True)``; ``idle_timeout`` raises
        ``StreamIdle`` when nothing was logged for that long."""
        client = await self._client()
        args = {"follow": follow, "tail": tail, "since": since}
        async for _, data in client.stream("sandbox.logs", args, idle_timeout=idle_timeout):
            yield log_event(data, self._redactor if redact else None)

    # ---- lifecycle --------------------------------------------------------------------

    async def stop(self) -> SandboxInfo:
        return SandboxInfo.from_wire((await self._call("sandbox.stop"))[0])

    async def start(self) -> SandboxInfo:
        return SandboxInfo.from_wire((await self._call("sandbox.start"))[0])

    async def pause(self) -> SandboxInfo:
        return SandboxInfo.from_wire((await self._call("sandbox.pause"))[0])

    async def resume(self, snapshot: str | Snapshot | None = None) -> SandboxInfo:
        return SandboxInfo.from_wire((await self._call("sandbox.resume", resume_args(snapshot)))[0])

    async def snapshot(
        self, name: str | None = None, *, expires: str | int | None = None, keep: bool = False
    ) -> Snapshot:
        return Snapshot.from_wire((await self._call("sandbox.snapshot", snapshot_args(name, expires, keep)))[0])

    async def destroy(self) -> None:
        """Remove the sandbox and everything it made; safe to call twice."""
        if self._killed:
            return
        try:
            await self._call("sandbox.destroy", timeout=120)
        except (errors.SandboxError, errors.SandboxNotFound):
            pass  # already gone: the supervisor exits right after answering
        finally:
            self._killed = True
            await self.close()

    async def kill(self) -> None:
        await self.destroy()

    async def close(self) -> None:
        """Drop this handle's connection without touching the sandbox."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


class AsyncCommands:
    """Processes in the sandbox. Reached as ``sandbox.commands``."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sandbox = sandbox

    async def run(
        self,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, Any] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout_seconds: float | None = 60,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        stdin: bytes | str | None = None,
        check: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        redact: bool = True,
        auto_resume: bool = False,
    ) -> CommandResult:
        """As ``Sandbox.commands.run``. Cancelling the awaiting task kills the process
        (its whole group) in the sandbox."""
        sandbox = self._sandbox
        args = command_args(argv, env, cwd, user, sandbox._secrets())
        args.update(run_options(timeout_seconds, max_output_bytes, auto_resume, redact,
                                check if sandbox.recorded else None))
        payload, staged = stdin_payload(stdin)
        if staged is not None:  # too big for one frame: staged as a guest file the agent opens and unlinks
            await sandbox.files.write(staged, payload, mode=0o600)
            args["stdin_path"], payload = staged, b""
        capture = OutputCapture(on_stdout, on_stderr, sandbox._redactor if redact else None)
        started = time.monotonic()
        try:
            result, _ = await sandbox._call("exec.run", args, payload, on_data=capture.on_data)
        except errors.CommandTimeout as exc:
            raise capture.timeout(exc) from None
        except errors.MvmError:
            if staged is not None:
                try:
                    await sandbox.files.remove(staged)
                except errors.MvmError:
                    pass
            raise
        return capture.result(args, result, started, check=check)

    async def start(
        self,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, Any] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        auto_resume: bool = False,
    ) -> AsyncProcess:
        args = command_args(argv, env, cwd, user, self._sandbox._secrets())
        args.update(stdin=stdin, auto_resume=auto_resume)
        result, _ = await self._sandbox._call("proc.start", args)
        pid, index = started_process(result)
        return AsyncProcess(self._sandbox, pid, index, audit_id=result.get("audit_id"), argv=list(args["argv"]),
                       agent_generation=result.get("agent_generation"))

    async def connect(self, pid: int) -> AsyncProcess:
        info, _ = await self._sandbox._call("proc.info", {"pid": int(pid)})
        return AsyncProcess(self._sandbox, int(pid), audit_id=info.get("audit_id"), argv=list(info.get("argv", [])),
                       agent_generation=info.get("agent_generation"))

    async def list(self) -> list[ProcessInfo]:
        result, _ = await self._sandbox._call("proc.list", {})
        return [ProcessInfo.from_wire(p) for p in result.get("processes", [])]


class AsyncProcess(ProcessHandle):
    """A process started in the sandbox (``await sandbox.commands.start(...)``)."""

    _sandbox: AsyncSandbox

    async def wait(self, timeout: float | None = None) -> int:
        """Its exit code (128+N if killed by signal N); ``CommandTimeout`` past ``timeout``."""
        if self._exit_code is None:
            result, _ = await self._sandbox._call("proc.wait", self._wait_args(timeout))
            return self._exited(result.get("exit_code"))
        return self._exit_code

    async def exit_code(self) -> int | None:
        """The exit code once it exited, else ``None`` (does not wait)."""
        if self._exit_code is None:
            info = await self.info()
            if info.running:
                return None
            return self._exited(info.exit_code)
        return self._exit_code

    async def info(self) -> ProcessInfo:
        return ProcessInfo.from_wire((await self._sandbox._call("proc.info", self._ref()))[0])

    async def is_running(self) -> bool:
        return await self.exit_code() is None

    async def signal(self, sig: str | int = "TERM", *, group: bool = True) -> None:
        await self._sandbox._call("proc.signal", signal_args(self._ref(), sig, group))

    async def kill(self) -> None:
        await self.signal("KILL")

    async def send_stdin(self, data: bytes | str) -> None:
        raw = payload_bytes(data, "data")
        for start in range(0, len(raw), CHUNK_SIZE):
            await self._sandbox._call("proc.stdin", {**self._ref(), "eof": False}, raw[start : start + CHUNK_SIZE])

    async def close_stdin(self) -> None:
        await self._sandbox._call("proc.stdin", {**self._ref(), "eof": True})

    async def output(self, *, replay: bool = True, idle_timeout: float | None = None) -> AsyncIterator[tuple[str, str]]:
        """``(stream, text)`` chunks as the process prints them, until it exits. With
        ``idle_timeout`` a process silent for that long raises ``StreamIdle`` (the process
        keeps running)."""
        client = await self._sandbox._client()
        decode = StreamDecoder(self._sandbox._redactor)
        args = {**self._ref(), "replay": replay}
        async for stream, data in client.stream("proc.attach", args, idle_timeout=idle_timeout):
            text = decode(stream, data)
            if text:
                yield stream, text

    async def lines(self, which: str = "stdout", *, idle_timeout: float | None = None) -> AsyncIterator[str]:
        """Lines of ``which`` (``"stdout"`` or ``"stderr"``) from the process's start until it exits."""
        splitter = LineSplitter(which)
        async for stream, text in self.output(idle_timeout=idle_timeout):
            for line in splitter.feed(stream, text):
                yield line
        for line in splitter.rest():
            yield line

    @property
    def stdout(self) -> AsyncIterator[str]:
        """``async for line in process.stdout``: its stdout lines (from its start) until it exits."""
        return self.lines("stdout")

    @property
    def stderr(self) -> AsyncIterator[str]:
        return self.lines("stderr")


class AsyncFiles:
    """Files in the sandbox. Reached as ``sandbox.files``; paths are absolute guest paths."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sandbox = sandbox

    async def write(
        self, path: str, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True, user: str | None = None
    ) -> FileEntry:
        """``Files.write``'s twin. Data over ``CHUNK_SIZE`` goes to a temp file in windows of
        chunks, then one commit renames it over ``path``. Cancelling the task before the
        commit aborts the write (the temp file is removed; ``path`` is untouched); a cancel
        that lands while the commit is in flight cannot undo it: ``path`` is then written,
        and the task still ends with ``CancelledError``."""
        path = absolute_path(path)
        raw = payload_bytes(data, "data")
        begin = as_user({"path": path, "mode": mode, "make_parents": make_parents}, user)
        client = await self._sandbox._client()
        if len(raw) <= CHUNK_SIZE:
            answer, _ = await client.call("fs.write", {**begin, "append": False}, raw)
            return written_entry(answer) or await self.stat(path, user=user)
        result, _ = await client.call("fs.write_begin", begin)
        handle = result["handle"]
        committed = False
        try:
            for window in chunk_windows(handle, raw):
                await client.call_many(window)
            answer, _ = await client.call("fs.write_end", {"handle": handle, "commit": True})
            committed = True
        finally:
            if not committed:
                try:
                    await asyncio.shield(client.call("fs.write_end", {"handle": handle, "commit": False}))
                except errors.MvmError:
                    pass
        return written_entry(answer) or await self.stat(path, user=user)

    async def read(self, path: str, *, max_bytes: int = DEFAULT_MAX_READ_BYTES, user: str | None = None) -> bytes:
        into = io.BytesIO()
        request = read_request(path, max_bytes, user)
        await self._sandbox._call(*request, on_data=gather_into(into))
        return into.getvalue()  # gathered in place (see read_request)

    async def read_text(
        self, path: str, *, encoding: str = "utf-8", max_bytes: int = DEFAULT_MAX_READ_BYTES, user: str | None = None
    ) -> str:
        return (await self.read(path, max_bytes=max_bytes, user=user)).decode(encoding, errors="replace")

    async def list(self, path: str = "/", *, user: str | None = None) -> list[FileEntry]:
        result, _ = await self._sandbox._call("fs.list", as_user({"path": absolute_path(path)}, user))
        return sorted((FileEntry.from_wire(e) for e in result.get("entries", [])), key=lambda e: e.name)

    async def stat(self, path: str, *, user: str | None = None) -> FileEntry:
        result, _ = await self._sandbox._call("fs.stat", as_user({"path": absolute_path(path)}, user))
        return FileEntry.from_wire(result)

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            await self.stat(path, user=user)
            return True
        except errors.FileNotFoundInSandbox:
            return False

    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755, user: str | None = None) -> None:
        args = as_user({"path": absolute_path(path), "parents": parents, "mode": mode}, user)
        await self._sandbox._call("fs.mkdir", args)

    async def remove(self, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        await self._sandbox._call("fs.remove", as_user({"path": absolute_path(path), "recursive": recursive}, user))

    async def move(self, src: str, dst: str, *, overwrite: bool = False, user: str | None = None) -> None:
        args = as_user({"src": absolute_path(src), "dst": absolute_path(dst), "overwrite": overwrite}, user)
        await self._sandbox._call("fs.move", args)


class AsyncPorts:
    """Port forwards (``await sandbox.ports.forward(guest_port=8000)``); close one with
    ``await fwd.aclose()``, ``async with`` or ``await sandbox.ports.close(fwd)``."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sandbox = sandbox

    async def forward(
        self, *, guest_port: int, host_port: int = 0, host: str = "127.0.0.1", allow_wildcard: bool = False,
        detach: bool = True,
    ) -> PortForward:
        args = forward_args(guest_port, host_port, host, allow_wildcard, detach)
        return PortForward.from_wire((await self._sandbox._call("port.forward", args))[0], sandbox=self._sandbox)

    async def list(self) -> list[PortForward]:
        result, _ = await self._sandbox._call("port.list")
        return [PortForward.from_wire(raw, sandbox=self._sandbox) for raw in result.get("forwards", [])]

    async def close(self, forward: PortForward | str | int) -> None:
        await self._sandbox._call("port.close", close_args(forward))


class AsyncNetwork:
    """The network policy of a running sandbox. Reached as ``sandbox.network``."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sandbox = sandbox

    async def policy(self) -> dict[str, Any]:
        return dict((await self._sandbox.describe()).network)

    async def update(
        self, allow: list[str] | tuple[str, ...] | None = None, *, mode: str | None = None,
        allow_wildcards: bool | None = None,
    ) -> dict[str, Any]:
        result, _ = await self._sandbox._call("network.update", update_args(allow, mode, allow_wildcards))
        return dict(result.get("network") or {})
