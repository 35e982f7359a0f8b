"""The ``proc.*`` operations: spawning, stdin, signals, and output/exit events.

* ``ProcessManager`` owns the process table. A process starts with a clean
  environment, in its own session, with stdout/stderr pipes (and a stdin pipe if
  asked for). It is spawned under the reaper's lock, so the reaper always finds
  its record and ``Popen`` never waits for it.
* ``OutputPump`` is one thread multiplexing every pipe: it reads output in
  ``CHUNK_SIZE`` pieces and sends ``proc.output`` events, feeds queued stdin, and
  sends ``proc.exit`` once the process was reaped *and* its output pipes reached
  EOF -- or ``LINGER_SECONDS`` after the reap if a descendant still holds them,
  which are then closed. All events of one pid come from this one thread, so
  ``proc.exit`` is always after the last ``proc.output``.
* Backpressure per process: a process started with ``output_window`` has that
  much credit; the pump reads its pipes only while credit is left and the host
  grants more (``proc.window``) as its readers take the output. A process whose
  reader stalls blocks on its full pipe (nothing is lost, nothing piles up here)
  while every other process keeps flowing. Without ``output_window`` (an older
  host) blocking on the channel is the only backpressure.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from ..protocol import codec
from ..protocol.codec import CHUNK_SIZE
from ..protocol.shown import shown
from . import accounts, proctree
from .errors import AgentError, Args, from_os_error, invalid
from .reaper import Reaper, exit_code_of

log = logging.getLogger("mvm.agent")

#: How long after a process was reaped its output pipes may stay open (held by descendants).
LINGER_SECONDS = 0.2
#: Stdin bytes queued for one process before ``proc.stdin`` is refused.
MAX_STDIN_BACKLOG = 16 * 1024 * 1024
#: Exited processes remembered for ``proc.list``/``proc.signal``.
MAX_EXITED = 1000
#: The table is trimmed once this many more processes than ``MAX_EXITED`` are in it.
_TRIM_BATCH = 100
#: Bytes of JSON a ``proc.list`` answer may carry (the header limit is 64 KiB).
LIST_BUDGET = 48 * 1024
#: Output drained from a pipe in the last moment before it is force-closed.
FINAL_DRAIN_BYTES = 4 * CHUNK_SIZE

SIGNALS = {
    "TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT, "HUP": signal.SIGHUP,
    "QUIT": signal.SIGQUIT, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2,
    "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT,
}

Emit = Callable[[bytes], None]
StdinReply = Callable[[dict[str, Any]], None]


@dataclass
class _StdinItem:
    data: memoryview
    eof: bool
    reply: StdinReply
    written: int = 0


@dataclass(eq=False)
class Process:
    """One process the agent started, from spawn to its reported exit."""

    pid: int
    argv: list[str]
    started_at: float
    popen: subprocess.Popen[bytes]
    outputs: dict[str, IO[bytes]]
    stdin: IO[bytes] | None
    pipe_inodes: tuple[int, ...]
    exit_code: int | None = None
    signal: int | None = None
    ended_at: float | None = None
    reaped_at: float | None = None  # time.monotonic() of the reap
    reported: bool = False  # proc.exit sent
    lingering: list[tuple[int, int]] = field(default_factory=list)  # (pid, starttime) holding pipes at close
    stdin_queue: deque[_StdinItem] = field(default_factory=deque)
    stdin_backlog: int = 0
    stdin_requested: bool = False
    #: Output bytes the host still accepts (``proc.window``); None: not flow-controlled.
    credit: int | None = None
    output_window: int | None = None  # the credit it started with (given again on a new host link)
    paused: bool = False  # out of credit: its pipes are not watched
    drain_left: int | None = None  # reaped, pipes force-closing: what may still be read of them

    @property
    def running(self) -> bool:
        return self.reaped_at is None

    def summary(self) -> dict[str, Any]:
        return {"pid": self.pid, "argv": self.argv, "running": self.running, "exit_code": self.exit_code,
                "signal": self.signal, "started_at": self.started_at, "ended_at": self.ended_at}


def _unread(pipe: IO[bytes]) -> int:
    """Bytes waiting in a pipe (FIONREAD): an empty one out of credit can be closed, losing nothing."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def parse_signal(value: Any) -> int:
    """``"TERM"``/``"SIGTERM"``/``15`` -> 15; anything else is an InvalidArgument naming ``signal``."""
    allowed = [*sorted(SIGNALS), "an integer signal number"]
    if isinstance(value, str):
        name = value.upper().removeprefix("SIG")
        if name in SIGNALS:
            return int(SIGNALS[name])
    elif isinstance(value, int) and not isinstance(value, bool) and value in signal.valid_signals():
        return int(value)
    raise invalid("signal", f"unknown signal {shown(value)}", allowed=allowed)


class ProcessManager:
    """The process table and the ``proc.*`` handlers."""

    def __init__(self, base_env: Callable[[], dict[str, str]], emit: Emit, default_cwd: str = "/",
                 default_user: str | None = None):
        self._base_env = base_env
        self._default_cwd = default_cwd
        self._default_user = default_user  # an OCI image's User (agent.system.IMAGE_CONFIG_PATH)
        self._lock = threading.Lock()
        self._table: dict[int, Process] = {}
        self.reaper = Reaper(self._on_exit)
        self.pump = OutputPump(emit)

    def start_threads(self) -> None:
        self.reaper.start()
        self.pump.start()

    # -- proc.start -------------------------------------------------------------

    def start(self, args: Args) -> tuple[dict[str, Any], Callable[[], None]]:
        """Spawn; returns the result and what to do once the response is sent (start pumping)."""
        argv = args.argv()
        request_env = args.env("env")
        raw_cwd = args.raw.get("cwd")
        if isinstance(raw_cwd, str) and raw_cwd and not raw_cwd.startswith("/"):  # relative: to the default
            args.raw["cwd"] = os.path.normpath(os.path.join(self._default_cwd, raw_cwd))
        cwd = args.path("cwd", default=self._default_cwd)
        want_stdin = args.boolean("stdin")
        window = args.integer("output_window", minimum=1, maximum=codec.MAX_GRANT)
        stdin_path = args.path("stdin_path", default="") or None
        account = accounts.acting_account(args, self._default_user)
        env = self._base_env()
        if account is not None:
            env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
        env.update({key: value for key, value in request_env.items() if value is not None})
        try:
            is_dir = stat.S_ISDIR(os.stat(cwd).st_mode)
        except FileNotFoundError:
            raise AgentError("FileNotFound", f"working directory {cwd} does not exist", path=cwd, field="cwd") from None
        except OSError as exc:
            raise from_os_error(exc, cwd) from None
        if not is_dir:
            raise AgentError("NotADirectory", f"working directory {cwd} is not a directory", path=cwd, field="cwd")
        executable = _resolve_command(argv[0], env.get("PATH", os.defpath), cwd)
        staged_stdin = _take_staged_stdin(stdin_path) if stdin_path is not None else None
        with self.reaper.lock:
            started_at = time.time()
            try:
                popen = subprocess.Popen(
                    argv, executable=executable, env=env, cwd=cwd, bufsize=0,
                    stdin=staged_stdin if staged_stdin is not None
                    else subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    start_new_session=True, close_fds=True, restore_signals=True,
                    **accounts.credentials(account),
                )
            except FileNotFoundError as exc:
                if staged_stdin is not None:
                    os.close(staged_stdin)
                missing = exc.filename if exc.filename is not None else argv[0]
                what = f"working directory {cwd}" if missing == cwd else f"command {argv[0]!r}"
                raise AgentError("FileNotFound", f"{what} not found", path=missing) from None
            except OSError as exc:
                if staged_stdin is not None:
                    os.close(staged_stdin)
                if exc.errno == errno.EAGAIN:  # fork refused: the pids limit is full
                    raise AgentError("TooLarge", f"cannot start {argv[0]}: the sandbox's process limit "
                                     "(max_processes) is reached", path=argv[0], errno="EAGAIN",
                                     field="max_processes") from None
                raise from_os_error(exc, argv[0]) from None
            if staged_stdin is not None:
                os.close(staged_stdin)  # the child has its copy
            assert popen.stdout is not None and popen.stderr is not None
            streams = [popen.stdout, popen.stderr] + ([popen.stdin] if popen.stdin is not None else [])
            for stream in streams:  # the pump never blocks on one process
                os.set_blocking(stream.fileno(), False)
            process = Process(
                pid=popen.pid, argv=argv, started_at=started_at, popen=popen,
                outputs={"stdout": popen.stdout, "stderr": popen.stderr}, stdin=popen.stdin,
                pipe_inodes=tuple(os.fstat(stream.fileno()).st_ino for stream in streams),
                stdin_requested=want_stdin, credit=window, output_window=window,
            )
            with self._lock:
                self._table[process.pid] = process
                if len(self._table) > MAX_EXITED + _TRIM_BATCH:  # not a scan of the table per start
                    self._trim()
        self.reaper.child_started()
        return {"pid": process.pid, "started_at": started_at}, lambda: self.pump.add(process)

    def _trim(self) -> None:
        finished = [p for p in self._table.values() if p.reported]
        if len(finished) > MAX_EXITED:
            finished.sort(key=lambda p: p.ended_at or 0.0)
            for process in finished[: len(finished) - MAX_EXITED]:
                del self._table[process.pid]

    def _on_exit(self, pid: int, status: int) -> None:
        """Reaper callback (under the reaper's lock): record the exit, wake the pump."""
        with self._lock:
            process = self._table.get(pid)
        if process is None or process.reaped_at is not None:
            return  # an orphan re-parented to us: reaped, nothing to report
        process.exit_code, process.signal = exit_code_of(status)
        process.popen.returncode = os.waitstatus_to_exitcode(status)  # Popen must never wait itself
        process.ended_at = time.time()
        process.reaped_at = time.monotonic()
        self.pump.wake()

    def _get(self, args: Args) -> Process:
        pid = args.integer("pid", required=True)
        with self._lock:
            process = self._table.get(pid)
        if process is None:
            raise AgentError("ProcessNotFound", f"no process {pid} was started by this agent", pid=pid)
        return process

    # -- proc.stdin / proc.signal / proc.list -------------------------------------

    def stdin(self, args: Args, payload: bytes, reply: StdinReply) -> None:
        """Queue stdin bytes; ``reply`` gets ``{written, closed}`` once they are in the pipe."""
        eof = args.boolean("eof")
        process = self._get(args)
        if not process.stdin_requested:
            raise AgentError("InvalidState", f"process {process.pid} was started without stdin "
                             "(proc.start with stdin: true)", pid=process.pid)
        if process.stdin_backlog + len(payload) > MAX_STDIN_BACKLOG:
            raise AgentError("TooLarge", f"process {process.pid} has {process.stdin_backlog} stdin bytes "
                             "not yet read; wait for earlier proc.stdin answers", pid=process.pid)
        self.pump.feed(process, _StdinItem(memoryview(payload), eof, reply))

    def signal(self, args: Args) -> dict[str, Any]:
        process = self._get(args)
        signum = parse_signal(args.raw.get("signal", "TERM"))
        group = args.boolean("group")
        with self.reaper.lock:  # the pid cannot be reaped (and reused) while we hold this
            leader_alive = process.reaped_at is None
            if leader_alive:
                try:
                    os.kill(process.pid, signum)
                    if group and signum in proctree.TERMINATING:
                        info = proctree.read_stat(process.pid)
                        if info is not None and info.state == "T":  # stopped: let it act on the signal
                            os.kill(process.pid, signal.SIGCONT)
                except ProcessLookupError:
                    leader_alive = False
        signalled = 1 if leader_alive else 0
        if group:
            pipes = process.pipe_inodes if not process.reported else ()
            select = proctree.family_of(process.pid, pipes, process.lingering)
            others = proctree.signal_family(lambda table: select(table) - {process.pid}, signum)
            signalled += others
        return {"signalled": signalled, "running": process.running}

    def list(self) -> dict[str, Any]:
        """Every known process, oldest first, kept under the header limit (``truncated`` if cut)."""
        with self._lock:
            processes = sorted(self._table.values(), key=lambda p: p.started_at)
        entries = [process.summary() for process in processes]
        if _json_size(entries) <= LIST_BUDGET:
            return {"processes": entries}
        for entry in entries:  # first shorten long command lines...
            argv = entry["argv"]
            if len(argv) > 8 or any(len(arg) > 128 for arg in argv):
                entry["argv"] = [arg[:128] for arg in argv[:8]]
                entry["argv_truncated"] = True
        sizes = [_json_size(entry) for entry in entries]
        total = sum(sizes)
        kept = []
        for entry, size in zip(entries, sizes, strict=True):  # ...then leave out the oldest finished ones
            if total > LIST_BUDGET and not entry["running"]:
                total -= size
                continue
            kept.append(entry)
        return {"processes": kept, "truncated": True}

    def kill_everything(self) -> None:
        """The agent is going away: kill every process it started and every descendant."""
        with self._lock:
            processes = list(self._table.values())
        for process in processes:
            if process.running or not process.reported:
                proctree.signal_family(proctree.family_of(process.pid, process.pipe_inodes, process.lingering),
                                       signal.SIGKILL)
        proctree.signal_family(proctree.children_of(os.getpid()), signal.SIGKILL)


def _json_size(value: Any) -> int:
    return len(json.dumps(value)) + 1  # ensure_ascii: an upper bound on the encoded size


def _take_staged_stdin(path: str) -> int:
    """Open a file the client staged as a process's stdin (too big for one frame) and
    unlink it: the process reads it to the end, nothing is left behind."""
    try:  # (O_NONBLOCK: a FIFO's open must not hold a worker until some writer comes)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise from_os_error(exc, path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise invalid("stdin_path", f"{path} is not a regular file", allowed="a file staged with fs.write")
    os.set_blocking(fd, True)
    try:
        os.unlink(path)
    except OSError:
        pass
    return fd


def _resolve_command(command: str, search_path: str, cwd: str) -> str:
    """The file ``command`` runs, or a FileNotFound/PermissionDenied naming it."""
    if "/" in command:
        candidate = command if command.startswith("/") else os.path.join(cwd, command)
        if not os.path.exists(candidate):
            raise AgentError("FileNotFound", f"command not found: {command}", path=command, field="argv")
        if os.path.isdir(candidate) or not os.access(candidate, os.X_OK):
            raise AgentError("PermissionDenied", f"{command} is not executable", path=command, field="argv")
        return candidate
    found = shutil.which(command, path=search_path)
    if found is None:
        raise AgentError("FileNotFound", f"command not found: {command} (searched PATH={search_path})",
                         path=command, field="argv")
    return found


class OutputPump(threading.Thread):
    """One thread for every pipe of every process (see the module docstring)."""

    def __init__(self, emit: Emit):
        super().__init__(name="mvm-output", daemon=True)
        self._emit = emit
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._commands: deque[Callable[[], None]] = deque()
        self._active: dict[int, Process] = {}

    # -- called from other threads ----------------------------------------------

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake-pending

    def add(self, process: Process) -> None:
        """Start pumping a new process (after its proc.start response went out)."""
        self._commands.append(lambda: self._add(process))
        self.wake()

    def feed(self, process: Process, item: _StdinItem) -> None:
        self._commands.append(lambda: self._queue_stdin(process, item))
        self.wake()

    def grant(self, pid: int, size: int) -> None:
        """The host takes ``size`` more output bytes of ``pid`` (``proc.window``; never blocks)."""
        self._commands.append(lambda: self._grant(pid, size))
        self.wake()

    def new_link(self) -> None:
        """A new host connection: its credit accounting starts afresh, at each process's window."""
        self._commands.append(self._reset_credit)
        self.wake()

    # -- the pump thread ----------------------------------------------------------

    def run(self) -> None:
        while True:
            try:
                self._step()
            except Exception:  # keep pumping whatever one process did
                log.exception("output pump error")
                time.sleep(0.05)

    def _step(self) -> None:
        for key, events in self._selector.select(self._timeout()):
            if key.data is None:
                self._drain_wakeups()
            else:
                key.data(events)
        while self._commands:
            self._commands.popleft()()
        self._finish_exited()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = [p.reaped_at + LINGER_SECONDS for p in self._active.values()  # (past it, a paused
                     if p.reaped_at is not None and not (p.paused and p.reaped_at + LINGER_SECONDS <= now)]
        # one waits for credit, not time)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _add(self, process: Process) -> None:
        self._active[process.pid] = process
        self._watch_outputs(process)

    def _watch_outputs(self, process: Process) -> None:
        for stream, pipe in process.outputs.items():
            self._selector.register(pipe.fileno(), selectors.EVENT_READ,
                                    lambda _events, p=process, s=stream: self._read(p, s))

    def _pause(self, process: Process) -> None:
        """Out of credit: stop watching its pipes (the process blocks once they are full)."""
        process.paused = True
        for pipe in process.outputs.values():
            self._selector.unregister(pipe.fileno())

    def _grant(self, pid: int, size: int) -> None:
        process = self._active.get(pid)
        if process is None or process.credit is None:
            return  # ended meanwhile (or not flow-controlled): nothing to resume
        process.credit += size
        if process.paused and process.credit > 0:
            process.paused = False
            self._watch_outputs(process)

    def _reset_credit(self) -> None:
        for process in self._active.values():
            if process.output_window is not None:
                process.credit = 0
                self._grant(process.pid, process.output_window)

    def _read(self, process: Process, stream: str, budget: int = CHUNK_SIZE) -> None:
        pipe = process.outputs[stream]
        if process.drain_left is not None:  # force-closing: only what is left of the final drain
            budget = min(budget, process.drain_left)
        while budget > 0:
            size = min(budget, CHUNK_SIZE)
            if process.credit is not None:
                if process.credit <= 0:
                    if not process.paused:
                        self._pause(process)
                    return
                size = min(size, process.credit)
            try:
                data = os.read(pipe.fileno(), size)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_output(process, stream)
                return
            budget -= len(data)
            if process.credit is not None:
                process.credit -= len(data)
            if process.drain_left is not None:
                process.drain_left -= len(data)
            self._emit(codec.event("proc.output", data, pid=process.pid, stream=stream))
        if process.credit is not None and process.credit <= 0 and not process.paused:
            self._pause(process)

    def _close_output(self, process: Process, stream: str) -> None:
        pipe = process.outputs.pop(stream)
        if not process.paused:
            self._selector.unregister(pipe.fileno())
        pipe.close()

    def _queue_stdin(self, process: Process, item: _StdinItem) -> None:
        if process.stdin is None:
            item.reply({"written": 0, "closed": True})
            return
        process.stdin_backlog += len(item.data)
        process.stdin_queue.append(item)
        self._update_stdin_interest(process)

    def _update_stdin_interest(self, process: Process) -> None:
        if process.stdin is None:
            return
        fd = process.stdin.fileno()
        registered = fd in self._selector.get_map()
        if process.stdin_queue and not registered:
            self._selector.register(fd, selectors.EVENT_WRITE, lambda _events, p=process: self._write_stdin(p))
        elif not process.stdin_queue and registered:
            self._selector.unregister(fd)

    def _write_stdin(self, process: Process) -> None:
        while process.stdin_queue and process.stdin is not None:
            item = process.stdin_queue[0]
            rest = item.data[item.written :]
            if rest:
                try:
                    written = os.write(process.stdin.fileno(), rest)
                except BlockingIOError:
                    return
                except OSError:  # EPIPE: the reader is gone
                    self._close_stdin(process)
                    return
                item.written += written
                process.stdin_backlog -= written
                if item.written < len(item.data):
                    continue
            process.stdin_queue.popleft()
            if item.eof:
                self._close_stdin(process, last=item)
                return
            item.reply({"written": item.written, "closed": False})
        self._update_stdin_interest(process)

    def _close_stdin(self, process: Process, last: _StdinItem | None = None) -> None:
        """Close the stdin pipe; answer every queued request (data still queued is dropped)."""
        if process.stdin is not None:
            fd = process.stdin.fileno()
            if fd in self._selector.get_map():
                self._selector.unregister(fd)
            try:
                process.stdin.close()
            except OSError:
                pass
            process.stdin = None
        if last is not None:
            last.reply({"written": last.written, "closed": False})
        while process.stdin_queue:
            item = process.stdin_queue.popleft()
            process.stdin_backlog -= len(item.data) - item.written
            item.reply({"written": item.written, "closed": True})

    def _finish_exited(self) -> None:
        now = time.monotonic()
        for process in [p for p in self._active.values() if p.reaped_at is not None]:
            if process.outputs:
                if now < process.reaped_at + LINGER_SECONDS:  # type: ignore[operator]
                    continue
                self._force_close_outputs(process)
                if process.outputs:
                    continue  # output still in a pipe waits for the host's credit
            self._close_stdin(process)
            del self._active[process.pid]
            process.reported = True
            self._emit(codec.event("proc.exit", pid=process.pid, exit_code=process.exit_code,
                                   signal=process.signal, ended_at=process.ended_at))

    def _force_close_outputs(self, process: Process) -> None:
        """A descendant still holds the pipes: remember who, send what is there (at most
        ``FINAL_DRAIN_BYTES``, within the host's credit), close them."""
        if process.drain_left is None:
            table = proctree.snapshot()
            holders = proctree.pipe_holders(process.pipe_inodes, table) - proctree.protected_pids()
            process.lingering = [(pid, table[pid].starttime) for pid in holders if pid in table]
            process.drain_left = FINAL_DRAIN_BYTES
        for stream in list(process.outputs):
            if process.drain_left > 0 and not process.paused:
                self._read(process, stream, budget=process.drain_left)
            if stream not in process.outputs:
                continue  # it reached EOF
            if process.paused and process.drain_left > 0 and _unread(process.outputs[stream]) > 0:
                continue  # the rest of the drain once the host grants more
            self._close_output(process, stream)
