"""``sandbox.commands``: run a command to completion, or start one and keep a handle."""

from __future__ import annotations

import codecs
import secrets
import signal as _signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import errors
from ..errors import shown
from ..protocol import CHUNK_SIZE
from ..protocol.requests import DEFAULT_MAX_OUTPUT_BYTES as DEFAULT_MAX_OUTPUT_BYTES  # the supervisor's default
from .files import payload_bytes
from .models import CommandResult, ProcessInfo

if TYPE_CHECKING:
    from .sandbox import Sandbox

#: Guest directory where a ``run`` stdin larger than one frame is staged (the agent unlinks it on start).
STDIN_STAGING_DIR = "/tmp/.mvm-stdin"


OutputCallback = Callable[[str], None]


class Commands:
    """Processes in the sandbox. Reached as ``sandbox.commands``."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def run(
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
        """Run ``argv`` to completion and return its ``CommandResult``.

        A string is run by ``/bin/sh -c``. Non-zero exit is a result, not an error
        (``check=True`` raises ``CommandError``); a process killed by signal N exits
        128+N (a shell that SIGTERMs itself: 143, not a timeout). Past ``timeout_seconds``
        the whole process tree (background children too) is killed and ``CommandTimeout``
        (a ``TimeoutError``) carries the partial output. ``stdin`` (bytes or text, any
        size, NULs included) is fed to the process, then its stdin is closed. ``cwd`` is
        absolute or relative to the default working directory (``/`` or the template's). ``user`` runs it as
        another guest account (name or uid; an unknown one raises ``UserNotFound``).
        Each stream's capture stops at ``max_output_bytes`` (``truncated=True``).
        With ``redact`` (the default) every known secret value in the output reads
        ``[redacted:NAME]``. A signed receipt of the result is at ``result.receipt_path``
        (``mvmctl receipt verify``).

        >>> result = sandbox.commands.run(["python", "/app/main.py"], timeout_seconds=30)
        >>> result.exit_code, result.stdout, result.audit_id
        """
        args = self._sandbox._command_args(argv, env, cwd, user)
        args.update(run_options(timeout_seconds, max_output_bytes, auto_resume, redact,
                                check if self._sandbox.recorded else None))
        payload, staged = stdin_payload(stdin)
        if staged is not None:  # too big for one frame: staged as a guest file the agent opens and unlinks
            self._sandbox.files.write(staged, payload, mode=0o600)
            args["stdin_path"], payload = staged, b""
        capture = OutputCapture(on_stdout, on_stderr, self._sandbox._redactor if redact else None)
        started = time.monotonic()
        try:
            result, _ = self._sandbox._client().call("exec.run", args, payload, on_data=capture.on_data)
        except errors.CommandTimeout as exc:
            raise capture.timeout(exc) from None
        except errors.MvmError:
            if staged is not None:  # the process never started: the agent did not take the file
                try:
                    self._sandbox.files.remove(staged)
                except errors.MvmError:
                    pass
            raise
        return capture.result(args, result, started, check=check)

    def start(
        self,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, Any] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        auto_resume: bool = False,
    ) -> Process:
        """Start ``argv`` and return at once with a ``Process`` handle.

        >>> p = sandbox.commands.start(["python", "-m", "http.server"], env={"MODE": "dev"})
        >>> p.pid, p.is_running()
        """
        args = self._sandbox._command_args(argv, env, cwd, user)
        args.update(stdin=stdin, auto_resume=auto_resume)
        result, _ = self._sandbox._client().call("proc.start", args)
        pid, index = started_process(result)
        return Process(self._sandbox, pid, index, audit_id=result.get("audit_id"), argv=list(args["argv"]),
                       agent_generation=result.get("agent_generation"))

    def connect(self, pid: int) -> Process:
        """A handle on a process started earlier (by this or another client)."""
        info, _ = self._sandbox._client().call("proc.info", {"pid": int(pid)})
        return Process(self._sandbox, int(pid), audit_id=info.get("audit_id"), argv=list(info.get("argv", [])),
                       agent_generation=info.get("agent_generation"))

    def list(self) -> list[ProcessInfo]:
        """Processes the guest agent knows (running and recently exited)."""
        result, _ = self._sandbox._client().call("proc.list", {})
        return [ProcessInfo.from_wire(p) for p in result.get("processes", [])]


_SIGNALS = {"TERM": _signal.SIGTERM, "KILL": _signal.SIGKILL, "INT": _signal.SIGINT, "HUP": _signal.SIGHUP}


class ProcessHandle:
    """What a handle of a started process knows, sync (``Process``) or asyncio (``AsyncProcess``).

    A process started in record/plan mode has ``pid=None`` and ``recorded=True``: its
    signals and stdin are recorded, its exit code and output do not exist.
    """

    def __init__(
        self,
        sandbox: Any,
        pid: int | None,
        recorded_index: int | None = None,
        *,
        audit_id: str | None = None,
        argv: list[str] | None = None,
        agent_generation: int | None = None,
    ):
        self._sandbox = sandbox
        self.pid = pid
        #: Which guest agent started it (the pid alone may be reused after an agent restart).
        self.agent_generation = agent_generation
        self.index = recorded_index
        self.audit_id = audit_id
        self.argv = argv or []
        self._exit_code: int | None = None  # once known; -1 when the agent could not tell

    @property
    def recorded(self) -> bool:
        return self.index is not None

    def __repr__(self) -> str:
        if self.index is not None:
            return f"<{type(self).__name__} #{self.index + 1} (recorded) argv={self.argv!r}>"
        return f"<{type(self).__name__} pid={self.pid} argv={self.argv!r}>"

    def _ref(self) -> dict[str, Any]:
        """How requests name it: its pid and the agent generation that started it (a pid
        may be reused after an agent restart), or its index in a recording."""
        if self.index is not None:
            return {"process": self.index}
        if self.agent_generation is None:
            return {"pid": self.pid}
        return {"pid": self.pid, "agent_generation": int(self.agent_generation)}

    def _wait_args(self, timeout: float | None) -> dict[str, Any]:
        args: dict[str, Any] = self._ref()
        if timeout is not None:
            args["timeout_seconds"] = timeout
        return args

    def _exited(self, code: int | None) -> int:
        self._exit_code = -1 if code is None else int(code)
        return self._exit_code


class Process(ProcessHandle):
    """A process started in the sandbox. Usable from any client that knows its pid."""

    _sandbox: Sandbox

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process exits; returns its exit code (128+N if killed by signal N).
        Raises ``CommandTimeout`` if it is still running after ``timeout`` seconds."""
        if self._exit_code is None:
            result, _ = self._sandbox._client().call("proc.wait", self._wait_args(timeout))
            return self._exited(result.get("exit_code"))
        return self._exit_code

    @property
    def exit_code(self) -> int | None:
        """The exit code once it exited, else ``None`` (does not block)."""
        if self._exit_code is None:
            info = self.info()
            if info.running:
                return None
            return self._exited(info.exit_code)
        return self._exit_code

    def is_running(self) -> bool:
        return self.exit_code is None

    def info(self) -> ProcessInfo:
        result, _ = self._sandbox._client().call("proc.info", self._ref())
        return ProcessInfo.from_wire(result)

    def signal(self, sig: str | int = "TERM", *, group: bool = True) -> None:
        """Send a signal to the process (and by default its whole process group)."""
        args = signal_args(self._ref(), sig, group)  # bad input is refused before connecting
        self._sandbox._client().call("proc.signal", args)

    def kill(self) -> None:
        """SIGKILL the process group and every descendant."""
        self.signal("KILL")

    def send_stdin(self, data: bytes | str) -> None:
        """Write to the process's stdin (it must have been started with ``stdin=True``)."""
        raw = payload_bytes(data, "data")
        for start in range(0, len(raw), CHUNK_SIZE):
            self._sandbox._client().call("proc.stdin", {**self._ref(), "eof": False}, raw[start : start + CHUNK_SIZE])

    def close_stdin(self) -> None:
        self._sandbox._client().call("proc.stdin", {**self._ref(), "eof": True})

    def output(self, *, replay: bool = True, idle_timeout: float | None = None) -> Iterator[tuple[str, str]]:
        """Yield ``(stream, text)`` chunks as the process prints them, until it exits.
        With ``replay`` the output printed before the call comes first. With
        ``idle_timeout`` a process silent for that long raises ``StreamIdle`` (the
        process keeps running)."""
        frames = self._sandbox._client().stream("proc.attach", {**self._ref(), "replay": replay},
                                                idle_timeout=idle_timeout)
        return self._decoded(frames)  # requested now: record mode refuses at the call

    def _decoded(self, frames: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, str]]:
        decode = StreamDecoder(self._sandbox._redactor)
        for stream, data in frames:
            text = decode(stream, data)
            if text:
                yield stream, text

    def lines(self, which: str = "stdout", *, idle_timeout: float | None = None) -> Iterator[str]:
        """Lines of ``which`` (``"stdout"`` or ``"stderr"``) from the process's start until it exits."""
        splitter = LineSplitter(which)  # a bad ``which`` and record mode refuse at the call
        return _split_lines(self.output(idle_timeout=idle_timeout), splitter)

    @property
    def stdout(self) -> Iterator[str]:
        """Iterate over the process's stdout lines (from its start) until it exits."""
        return self.lines("stdout")

    @property
    def stderr(self) -> Iterator[str]:
        return self.lines("stderr")


# ---- request building and response parsing, shared with ``mvm.AsyncSandbox`` ----------------


def run_options(
    timeout_seconds: float | None, max_output_bytes: int, auto_resume: bool, redact: bool, recorded_check: bool | None
) -> dict[str, Any]:
    """The ``exec.run`` arguments besides the command itself. ``check`` is the SDK's own
    (the supervisor has no use for it, so live it is not sent); a recording keeps it in
    the IR, so a recorded handle passes ``recorded_check`` and it travels as ``check``."""
    options: dict[str, Any] = {
        "timeout_seconds": timeout_seconds,
        "max_output_bytes": max_output_bytes,
        "auto_resume": auto_resume,
        "redact": redact,
    }
    if recorded_check is not None:
        options["check"] = bool(recorded_check)
    return options


def started_process(result: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(pid, recorded index)`` of a ``proc.start`` answer (a recording names its process
    by index and has no pid)."""
    pid, index = result.get("pid"), result.get("process")
    return (None if pid is None else int(pid)), (None if index is None else int(index))


def stdin_payload(stdin: bytes | str | None) -> tuple[bytes, str | None]:
    """``(bytes, staging path or None)``: stdin larger than one frame is staged as a guest file."""
    payload = b"" if stdin is None else payload_bytes(stdin, "stdin")
    if len(payload) > CHUNK_SIZE:
        return payload, f"{STDIN_STAGING_DIR}/{secrets.token_hex(8)}"
    return payload, None


def signal_args(process: dict[str, Any], sig: str | int, group: bool) -> dict[str, Any]:
    """``proc.signal`` arguments for ``process`` (``ProcessHandle._ref``); an unknown signal
    name raises ``InvalidArgument``."""
    if isinstance(sig, str) and sig.upper().removeprefix("SIG") not in _SIGNALS:
        raise errors.InvalidArgument("signal", f"unknown signal {shown(sig)}", allowed=sorted(_SIGNALS))
    name = sig.upper().removeprefix("SIG") if isinstance(sig, str) else int(sig)
    return {**process, "signal": name, "group": group}


class StreamDecoder:
    """Incremental UTF-8 per stream (a character split across frames stays whole), redacted."""

    def __init__(self, redactor: Callable[[str], str] | None):
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}
        self._redactor = redactor

    def __call__(self, stream: str, data: bytes) -> str:
        decoder = self._decoders.get(stream)
        text = decoder.decode(data) if decoder is not None else data.decode("utf-8", "replace")
        return self._redactor(text) if self._redactor and text else text


class LineSplitter:
    """Whole lines (with their newline) of one stream out of ``(stream, text)`` chunks."""

    def __init__(self, which: str):
        if which not in ("stdout", "stderr"):
            raise errors.InvalidArgument("which", f"{shown(which)}", allowed=["stdout", "stderr"])
        self._which = which
        self._pending = ""

    def feed(self, stream: str, text: str) -> list[str]:
        if stream != self._which:
            return []
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        return [line + "\n" for line in lines]

    def rest(self) -> list[str]:
        rest, self._pending = self._pending, ""
        return [rest] if rest else []


def _split_lines(chunks: Iterator[tuple[str, str]], lines: LineSplitter) -> Iterator[str]:
    for stream, text in chunks:
        yield from lines.feed(stream, text)
    yield from lines.rest()


class OutputCapture:
    """Collects an ``exec.run``'s data frames and turns its response into a ``CommandResult``."""

    def __init__(
        self,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        redactor: Callable[[str], str] | None,
    ):
        self._collected: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._decode = StreamDecoder(redactor)
        self._redactor = redactor

    def on_data(self, stream: str, data: bytes) -> None:
        if stream not in self._collected:
            return
        self._collected[stream] += data
        callback = self._callbacks[stream]
        if callback is not None:
            text = self._decode(stream, data)
            if text:
                callback(text)

    def text_of(self, stream: str) -> str:
        text = self._collected[stream].decode("utf-8", errors="replace")  # (no bytes() copy of it first)
        return self._redactor(text) if self._redactor else text

    def timeout(self, exc: errors.CommandTimeout) -> errors.CommandTimeout:
        """The supervisor's ``CommandTimeout`` with the output printed before it."""
        return errors.CommandTimeout(
            exc.message, stdout=self.text_of("stdout"), stderr=self.text_of("stderr"), **exc.details
        )

    def result(self, args: dict[str, Any], result: dict[str, Any], started: float, *, check: bool) -> CommandResult:
        command_result = CommandResult(
            exit_code=result.get("exit_code"),
            stdout=self.text_of("stdout"),
            stderr=self.text_of("stderr"),
            audit_id=result.get("audit_id"),
            duration_seconds=float(result.get("duration_seconds", time.monotonic() - started)),
            truncated=bool(result.get("truncated")),
            signal=result.get("signal"),
            pid=result.get("pid"),
            stdout_bytes=int(result.get("stdout_bytes", 0)),
            stderr_bytes=int(result.get("stderr_bytes", 0)),
            receipt_path=result.get("receipt_path"),
            recorded=bool(result.get("recorded")),
        )
        if check and not command_result.recorded and command_result.exit_code != 0:
            raise errors.CommandError(
                f"command {shown(list(args['argv']))} exited with {command_result.exit_code}: "
                f"{command_result.stderr.strip()[-500:]}",
                result=command_result,
            )
        return command_result
