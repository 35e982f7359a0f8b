"""Test harness: the real guest agent as a subprocess, and a small host-side client.

``launch`` starts an agent exactly as the namespace backend does (``--fd N`` on
one end of a socketpair); ``AgentClient`` speaks the protocol with it through
``FramedChannel``: requests by id, events collected per pid.
"""

from __future__ import annotations

import atexit
import glob
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvm.agent.install import install_into
from mvm.protocol import codec
from mvm.protocol.channel import ChannelClosed, FramedChannel
from mvm.protocol.codec import Frame, ProtocolError

CANARY = "MVM_TEST_CANARY"
CANARY_VALUE = "host-secret-must-not-leak"
AGENT_MODULE = [sys.executable, "-m", "mvm.agent"]
#: Set to an interpreter (e.g. a Python 3.13) to run every agent test on it, from an installed tree.
AGENT_PYTHON_ENV = "MVM_TEST_AGENT_PYTHON"
_installed_for: dict[str, list[str]] = {}


class AgentFailure(Exception):
    """The agent answered a request with ``ok: false``."""

    def __init__(self, error: dict[str, Any]):
        super().__init__(f"{error.get('type')}: {error.get('message')}")
        self.error = error
        self.type = error.get("type")


@dataclass
class Completed:
    pid: int
    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: int | None
    events: list[Frame] = field(default_factory=list)


class AgentClient:
    """The host side of one agent: requests by id, events collected per pid."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket):
        self.process = process
        self.sock = sock
        self.channel = FramedChannel(sock, receive_fds=True)  # (a handoff brings a socket)
        self._ids = iter(range(1, 1 << 30))
        self._responses: dict[int, queue.Queue[Frame]] = {}
        self._lock = threading.Lock()
        self._events: list[Frame] = []
        self.data: list[Frame] = []  # stream bytes (``data`` frames), e.g. of tcp.* streams
        self._cond = threading.Condition()
        self.hellos: queue.Queue[Frame] = queue.Queue()
        self.closed = threading.Event()
        self.close_reason: str | None = None
        first = self.channel.recv()  # the agent speaks first...
        self.hello = codec.check_hello(first)
        self.channel.send_raw(codec.hello("supervisor"))  # ...and accepts ours
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                frame = self.channel.recv()
                if frame.kind == "data":
                    with self._cond:
                        self.data.append(frame)
                        self._cond.notify_all()
                elif frame.kind == "response":
                    with self._lock:
                        box = self._responses.setdefault(frame.id, queue.Queue())  # type: ignore[arg-type]
                    box.put(frame)
                elif frame.kind == "event":
                    with self._cond:
                        self._events.append(frame)
                        self._cond.notify_all()
                elif frame.kind == "hello":
                    self.hellos.put(frame)
        except (ChannelClosed, ProtocolError, OSError) as exc:
            self.close_reason = str(exc)
        self.closed.set()
        with self._cond:
            self._cond.notify_all()

    # -- requests -------------------------------------------------------------------

    def send_request(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"") -> int:
        ident = next(self._ids)
        with self._lock:
            self._responses.setdefault(ident, queue.Queue())
        self.channel.send_raw(codec.request(ident, op, args, payload))
        return ident

    def response(self, ident: int, timeout: float = 10) -> Frame:
        with self._lock:
            box = self._responses.setdefault(ident, queue.Queue())
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response to request {ident} within {timeout} s") from None

    def answered(self, ident: int) -> bool:
        """Has a response to request ``ident`` arrived (and not been taken yet)?"""
        with self._lock:
            box = self._responses.get(ident)
        return box is not None and not box.empty()

    def request(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"",
                timeout: float = 10) -> Frame:
        return self.response(self.send_request(op, args, payload), timeout)

    def call(self, op: str, payload: bytes = b"", timeout: float = 10, **args: Any) -> dict[str, Any]:
        """The result of ``op``; raises ``AgentFailure`` on an error response."""
        return self.call_with_payload(op, payload, timeout, **args)[0]

    def call_with_payload(self, op: str, payload: bytes = b"", timeout: float = 10,
                          **args: Any) -> tuple[dict[str, Any], bytes]:
        frame = self.request(op, args, payload, timeout)
        if not frame.header["ok"]:
            raise AgentFailure(frame.header["error"])
        return frame.header["result"], frame.payload

    def error(self, op: str, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        """The error ``op`` fails with (the test fails if it succeeds)."""
        frame = self.request(op, args, payload)
        assert not frame.header["ok"], f"{op} {args} unexpectedly succeeded: {frame.header}"
        error = frame.header["error"]
        assert isinstance(error.get("message"), str) and error["message"]
        return error

    # -- processes ------------------------------------------------------------------

    def start(self, argv: list[str], **args: Any) -> int:
        return int(self.call("proc.start", argv=argv, **args)["pid"])

    def events_for(self, pid: int) -> list[Frame]:
        with self._cond:
            return [e for e in self._events if e.header.get("pid") == pid]

    def wait_exit(self, pid: int, timeout: float = 10) -> Completed:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                events = [e for e in self._events if e.header.get("pid") == pid]
                exits = [e for e in events if e.header["event"] == "proc.exit"]
                if exits:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed.is_set():
                    raise AssertionError(f"no proc.exit for pid {pid} within {timeout} s")
                self._cond.wait(remaining)
        assert len(exits) == 1, "exactly one proc.exit per process"
        assert events[-1] is exits[0], "proc.exit must come after every proc.output of its pid"
        out = b"".join(e.payload for e in events if e.header.get("stream") == "stdout")
        err = b"".join(e.payload for e in events if e.header.get("stream") == "stderr")
        header = exits[0].header
        return Completed(pid, out, err, header["exit_code"], header.get("signal"), events)

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float = 10, **args: Any) -> Completed:
        pid = self.start(argv, stdin=stdin is not None, **args)
        if stdin is not None:
            self.call("proc.stdin", stdin, pid=pid, eof=True)
        return self.wait_exit(pid, timeout)

    def close(self) -> None:
        self.channel.close()


@dataclass
class AgentProcess:
    """A started agent process and the host end of its socket (before any hello)."""

    process: subprocess.Popen[bytes]
    sock: socket.socket

    def client(self) -> AgentClient:
        return AgentClient(self.process, self.sock)

    def wait(self, timeout: float = 10) -> int:
        return self.process.wait(timeout)


def launch(prefix: list[str] | None = None, command: list[str] | None = None,
           env: dict[str, str] | None = None) -> AgentProcess:
    """Start an agent on one end of a fresh socketpair (``--fd <that end>``)."""
    host_end, agent_end = socket.socketpair()
    fd = agent_end.fileno()
    child_env = {**os.environ, CANARY: CANARY_VALUE, **(env or {})}
    process = subprocess.Popen([*(prefix or []), *(command or default_agent_command()), "--fd", str(fd)],
                               pass_fds=[fd], env=child_env)
    agent_end.close()
    return AgentProcess(process, host_end)


SYSTEM_PYTHON = "/usr/bin/python3"


def installed_agent_command(root: Path, python: str = SYSTEM_PYTHON) -> list[str]:
    """Install the agent under ``root/opt/mvm`` (as a template build does) and return the argv
    that runs it with ``python -I`` -- the guest's way: stdlib only, no site-packages."""
    install_into(root)
    for directory in [root, *root.parents]:  # let an unprivileged agent reach it
        if directory == Path(tempfile.gettempdir()) or directory == Path("/"):
            break
        directory.chmod(directory.stat().st_mode | 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            path.chmod(path.stat().st_mode | 0o755 if path.is_dir() else path.stat().st_mode | 0o644)
    launcher = (root / "opt/mvm/bin/mvm-agent").read_text()
    launcher = launcher.replace('"/opt/mvm"', repr(str(root / "opt/mvm")))
    return [python, "-I", "-c", launcher]


def default_agent_command() -> list[str]:
    """``python -m mvm.agent`` from this checkout, or the installed agent on $MVM_TEST_AGENT_PYTHON."""
    python = os.environ.get(AGENT_PYTHON_ENV)
    if not python:
        return AGENT_MODULE
    if python not in _installed_for:
        root = Path(tempfile.mkdtemp(prefix="mvm-agent-install-"))
        atexit.register(shutil.rmtree, root, True)
        _installed_for[python] = installed_agent_command(root, python)
    return _installed_for[python]


def guest_pythons() -> list[str]:
    """Interpreters like the guests' (Debian's python3, a 3.13) found on this host."""
    candidates = [SYSTEM_PYTHON, "/usr/bin/python3.13", "/usr/local/bin/python3.13",
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.13*/bin/python3.13")))]
    return [path for path in candidates if os.path.exists(path)]


def unshare_available(*flags: str) -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0


def pid_exists(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
