"""One QEMU process of a ``VmInstance``: launching it, its QMP connection, reaching the
guest agent on its virtio-serial socket, its (bounded) console log, and killing it.

The instance decides *what* runs (disk layers, incoming migration, snapshots); this
module only knows how to run it and how to explain a failure (console and QEMU tails).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import InvalidArgument, SandboxError
from ...osutil import signal_name
from ...protocol.channel import ChannelClosed, FramedChannel
from ...protocol.codec import ProtocolError
from .deadline import GuestDeadline
from .initramfs import INIT_FAIL_PREFIX
from .process import spawn, terminate
from ...agent import keeper
from .qemu import QemuConfig
from .qmp import QmpClient

CONSOLE_MAX = 1024 * 1024  # console.log is rotated to console.log.1 past this
#: QMP commands wait this long at most (a memory migration is the slowest).
QMP_TIMEOUT = 300.0
#: Signals QEMU dies of when killed by someone (a user, the OOM killer), never of its own accord.
_KILLED_FROM_OUTSIDE = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes including the NUL


def socket_dir_for(backend_dir: Path, sandbox_id: str) -> Path:
    """``backend_dir`` itself, or ``/tmp/mvm-<uid>/<id>`` when its socket paths would be too long."""
    if len(str(backend_dir / "agent.sock").encode()) <= _SUN_PATH_MAX - 4:
        return backend_dir
    short = Path(f"/tmp/mvm-{os.getuid()}") / sandbox_id
    if len(str(short / "agent.sock").encode()) > _SUN_PATH_MAX:
        raise InvalidArgument("sandbox_id", "too long for a Unix socket path", allowed="<= 64 characters")
    short.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(short.parent, 0o700)
    short.mkdir(mode=0o700, exist_ok=True)
    return short


class QemuMachine:
    """The running (or not) QEMU of one instance. ``on_change`` is called whenever the
    process starts or goes, so the instance can record its pid for ``cleanup_orphan``."""

    def __init__(self, directory: Path, socket_dir: Path, on_change: Callable[[], None]):
        self.dir = directory
        self.socket_dir = socket_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self._on_change = on_change
        self._console_thread: threading.Thread | None = None
        self._console_stop = threading.Event()
        #: Called (on the init port's thread) when the guest's keeper says the agent died;
        #: the keeper starts a new one after ``let_agent_start`` (agent/keeper.py).
        self.on_agent_ended: Callable[[], None] | None = None
        self._init_port: socket.socket | None = None
        self._restart_waiting: int | None = None

    @property
    def agent_socket(self) -> Path:
        return self.socket_dir / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.socket_dir / "qmp.sock"

    @property
    def init_socket(self) -> Path:
        return self.socket_dir / "init.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def launch(self, config: QemuConfig, pass_fds: tuple[int, ...] = ()) -> None:
        for sock in (self.agent_socket, self.qmp_socket, self.init_socket):
            sock.unlink(missing_ok=True)
        self.proc = spawn(config.argv(), self.dir / "qemu.log", pass_fds)
        self._on_change()
        self._start_console_watch()
        qmp = QmpClient(self.qmp_socket, timeout=QMP_TIMEOUT)
        try:
            qmp.connect(time.monotonic() + 10, alive=lambda: self.proc is not None and self.proc.poll() is None)
        except SandboxError:
            signum = self.killed_by()
            self.kill()
            if signum is not None:
                raise SandboxError(f"vm: QEMU was killed by {signal_name(signum)} as it started: {self.diagnostics()}",
                                   qemu_signal=signum) from None
            raise SandboxError(f"vm: QEMU did not start: {self.diagnostics()}") from None
        self.qmp = qmp
        if config.init_socket is not None:
            try:
                self._watch_init_port()
            except SandboxError:
                self.kill()
                raise

    def _watch_init_port(self) -> None:
        """Connect to the guest keeper's port and serve its ``agent-ended N`` lines on a
        thread (until QEMU exits): ``on_agent_ended``, then ``go N`` (``let_agent_start``)."""
        port = self.connect_unix(self.init_socket, time.monotonic() + 10)
        self._init_port = port
        proc = self.proc

        def serve() -> None:
            buffer = b""
            try:
                while True:
                    chunk = port.recv(keeper.MAX_LINE)
                    if not chunk:
                        return  # QEMU exited
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        words = line.split()
                        if len(words) == 2 and words[0] == b"agent-ended" and words[1].isdigit():
                            self._restart_waiting = int(words[1])
                            callback = self.on_agent_ended
                            if callback is not None and self.proc is proc:
                                callback()
                            self.let_agent_start()
                    buffer = buffer[-keeper.MAX_LINE:]  # a guest sending no newline stays bounded
            except OSError:
                return
            finally:
                port.close()

        threading.Thread(target=serve, daemon=True, name="mvm-vm-init-port").start()

    def let_agent_start(self) -> None:
        """Answer the keeper's ``agent-ended N`` with ``go N`` (once)."""
        restart, self._restart_waiting = self._restart_waiting, None
        port = self._init_port
        if restart is not None and port is not None:
            try:
                port.sendall(keeper.go_line(restart))
            except OSError:
                pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def killed_by(self) -> int | None:
        """The signal QEMU was killed with from outside (before our ``kill``: a user, the
        OOM killer), if so; not a crash of its own (SIGABRT, SIGSEGV on a bad image)."""
        code = self.proc.poll() if self.proc is not None else None
        return -code if code is not None and -code in _KILLED_FROM_OUTSIDE else None

    def kill(self) -> None:
        self._init_port = None  # (its thread closes it when QEMU is gone)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            terminate(self.proc, grace=2.0)
            self.proc = None
        self._console_stop.set()
        for sock in (self.agent_socket, self.qmp_socket, self.init_socket):
            sock.unlink(missing_ok=True)
        self._on_change()

    def quit(self) -> None:
        """Ask QEMU to quit (the guest's disk caches are QEMU's: a kill could lose writes), then kill."""
        if self.qmp is not None and self.alive():
            try:
                self.qmp.execute("quit")
            except SandboxError:
                pass
            assert self.proc is not None
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def connect_agent(self, deadline: float) -> socket.socket:
        return self.connect_unix(self.agent_socket, deadline)

    def connect_unix(self, path: Path, deadline: float) -> socket.socket:
        """Connect to one of QEMU's chardev sockets (retrying until QEMU made it)."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except OSError:
                sock.close()
            if time.monotonic() > deadline or not self.alive():
                raise SandboxError(f"vm: cannot connect to {path.name}: {self.diagnostics()}")
            time.sleep(0.005)

    def await_agent(self, deadline: GuestDeadline, *, accel: str) -> socket.socket:
        """Connect and exchange hellos: proves the guest booted to a working agent."""
        sock = self.connect_agent(deadline.wall_limit)
        channel = FramedChannel(sock)
        result: dict[str, Any] = {}

        def handshake() -> None:
            try:
                result["hello"] = channel.handshake("supervisor")
            except (ChannelClosed, ProtocolError, OSError) as exc:
                result["error"] = exc

        worker = threading.Thread(target=handshake, daemon=True, name="mvm-vm-hello")
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
            if deadline.expired() or not self.alive():
                break
        if "hello" in result:
            return sock
        timed_out = "error" not in result
        sock.close()  # unblocks the worker
        if self.proc is not None:
            try:  # a guest that died resets the channel a moment before QEMU exits
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        exited = not self.alive()
        self.kill()
        if exited:
            why = "the VM exited before the agent answered (guest init or agent failed)"
        elif not timed_out:
            why = f"the agent channel failed ({result['error']})"
        else:
            why = f"the guest agent did not answer {deadline.describe()} (accelerator {accel})"
        raise SandboxError(f"vm: boot failed: {why}; {self.diagnostics()}", console_tail=self.console_tail())

    # ------------------------------------------------------------------ console and diagnostics

    def console_tail(self, lines: int = 25) -> str:
        try:
            data = self.console_log.read_bytes()[-16384:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def diagnostics(self) -> str:
        parts = []
        tail = self.console_tail()
        init_lines = [line for line in tail.splitlines() if line.startswith(INIT_FAIL_PREFIX)]
        if init_lines:
            parts.append("guest init said: " + " | ".join(init_lines))
        if tail:
            parts.append("console tail:\n" + tail)
        try:
            qlog = (self.dir / "qemu.log").read_bytes()[-2000:].decode(errors="replace").strip()
        except OSError:
            qlog = ""
        if qlog:
            parts.append("qemu said: " + qlog)
        return "\n".join(parts) or "no console output"

    def rotate_console(self) -> None:
        """A new boot starts a new console.log; the previous one is kept as ``.1``."""
        try:
            if self.console_log.stat().st_size > 0:
                os.replace(self.console_log, self.console_log.with_name(self.console_log.name + ".1"))
        except OSError:
            pass

    def _start_console_watch(self) -> None:
        self._console_stop = threading.Event()
        stop = self._console_stop
        console_log = self.console_log

        def watch() -> None:
            while not stop.wait(2.0):
                trim_console(console_log)

        self._console_thread = threading.Thread(target=watch, daemon=True, name="mvm-vm-console")
        self._console_thread.start()


def trim_console(path: Path) -> None:
    """Keep the guest's console bounded: past CONSOLE_MAX, keep the last part in ``.1`` and empty
    the live file (QEMU appends, so it keeps writing at the new end)."""
    try:
        if path.stat().st_size <= CONSOLE_MAX:
            return
        with path.open("rb") as f:
            f.seek(-CONSOLE_MAX // 4, os.SEEK_END)
            tail = f.read()
        path.with_name(path.name + ".1").write_bytes(tail)
        os.truncate(path, 0)
    except OSError:
        pass
