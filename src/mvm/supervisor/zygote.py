"""A per-client fork server for supervisors: creates skip Python start-up and imports.

Starting a supervisor as a fresh ``python -m mvm.supervisor`` costs ~0.1 s of
interpreter start and imports before it even touches the backend. A process that
creates several sandboxes starts one zygote (on its first create): a single-
threaded child that has imported the supervisor and both backends once and forks
a supervisor per request. It is not a host daemon: it belongs to the creating
process and exits when that process does (its request socket reaches EOF, or
PR_SET_PDEATHSIG fires). Forking is safe here because the zygote never runs a
second thread; the creating process itself never forks.

Request (one per create, over a socketpair): a JSON line ``{"directory", "environ",
"secret_env"}`` with the readiness pipe's write end attached (SCM_RIGHTS). Reply:
one line, ``ok`` or an error text. Secret values travel in memory only.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

_MAX_REQUEST = 1 << 20


class Zygote:
    """The creating process's handle on its zygote (started lazily, shared by threads)."""

    _lock = threading.Lock()
    _instance: Zygote | None = None

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MVM_SECRET_")}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mvm.supervisor.zygote", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd="/",
        )
        child.close()
        self._sock = parent
        self._reader = parent.makefile("rb")
        self._request_lock = threading.Lock()

    @classmethod
    def shared(cls) -> Zygote | None:
        """This process's zygote, started on first use; None if it cannot run here."""
        if os.environ.get("MVM_ZYGOTE", "1") == "0":
            return None
        with cls._lock:
            if cls._instance is not None and cls._instance._proc.poll() is None:
                return cls._instance
            try:
                cls._instance = cls()
            except OSError:
                cls._instance = None
            return cls._instance

    def spawn(self, directory: Path, secret_env: dict[str, str], ready_fd: int) -> bool:
        """Ask for a supervisor of ``directory``; False if the zygote is gone (fall back)."""
        message = (
            json.dumps(
                {
                    "directory": str(directory),
                    "environ": {k: v for k, v in os.environ.items() if not k.startswith("MVM_SECRET_")},
                    "secret_env": secret_env,
                }
            ).encode()
            + b"\n"
        )
        with self._request_lock:
            try:
                socket.send_fds(self._sock, [message], [ready_fd])
                reply = self._reader.readline()
            except OSError:
                return False
        return reply.strip() == b"ok"


# ---- the zygote process ----------------------------------------------------------------


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(sock: socket.socket) -> None:
    buffer = b""
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
        if not data:
            return
        buffer += data
        if len(buffer) > _MAX_REQUEST:
            return
        if b"\n" not in buffer:
            for fd in fds:
                os.close(fd)
            continue
        line, buffer = buffer.split(b"\n", 1)
        try:
            request: dict[str, Any] = json.loads(line)
            ready_fd = fds[0]
        except (ValueError, IndexError):
            sock.sendall(b"bad request\n")
            continue
        _fork_supervisor(request, ready_fd, sock)
        for fd in fds:
            os.close(fd)
        sock.sendall(b"ok\n")


def _fork_supervisor(request: dict[str, Any], ready_fd: int, sock: socket.socket) -> None:
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)  # the intermediate exits at once; the supervisor is init's
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        sock.close()
        directory = Path(request["directory"])
        os.environ.clear()
        os.environ.update(request["environ"])
        log = os.open(directory / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        for fd in (null, log):
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ctypes.CDLL(None).prctl(1, 0)  # the supervisor must outlive the zygote
        from .server import run

        code = run(directory, ready_fd, dict(request["secret_env"]))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(code)


def main() -> None:
    _die_with_parent()
    sock = socket.socket(fileno=int(sys.argv[1]))
    # Import everything a supervisor needs once, here, so each fork starts warm.
    from . import server  # noqa: F401
    from ..snapshots import save_restore, store  # noqa: F401
    from ..backends import backend_names, get_backend
    from ..security import audit, receipts  # noqa: F401

    for name in backend_names():
        try:
            get_backend(name)
        except Exception:
            pass
    try:
        _serve(sock)
    except (OSError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
