"""Building bubblewrap's command line and launching it.

bwrap 0.8 (Debian 12) is the baseline: no ``--overlay`` (the overlay is mounted by
the backend before bwrap runs), but ``--userns``, ``--bind-fd``, ``--info-fd``,
``--disable-userns`` and ``--seccomp`` exist.

The launch happens on one long-lived thread of this process: ``--die-with-parent``
uses PR_SET_PDEATHSIG, which fires when the *thread* that forked bwrap exits, not
the process. A sandbox started from a short-lived worker thread would otherwise die
with that thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

AGENT_FD = 3
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class BwrapConfig:
    root_fd: int | None  # --bind-fd (idmapped root, reached through /proc/self/fd)
    root_path: str | None  # --bind (when bwrap can traverse the path itself)
    userns_fd: int | None  # --userns (the sandbox's own user namespace); None: --unshare-user
    seccomp_fd: int
    info_fd: int
    command: list[str]
    hostname: str = "sandbox"
    shm_bytes: int = 64 * 1024 * 1024
    env: dict[str, str] = field(default_factory=dict)
    cap_add: tuple[str, ...] = ()  # kept after --cap-drop ALL (only inside an unprivileged user namespace)


def build_argv(cfg: BwrapConfig, bwrap: str = "bwrap") -> list[str]:
    argv = [bwrap]
    if cfg.userns_fd is not None:
        # sandbox uid/gid 0 is the first id of the namespace's map (an unprivileged host id)
        argv += ["--userns", str(cfg.userns_fd), "--uid", "0", "--gid", "0"]
    else:
        argv += ["--unshare-user", "--uid", "0", "--gid", "0", "--disable-userns"]
    argv += [
        "--unshare-pid",
        "--unshare-net",  # loopback only
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname",
        cfg.hostname,
    ]
    env = {"PATH": SANDBOX_PATH, "HOME": "/root", "LANG": "C.UTF-8", "container": "mvm", **cfg.env}
    for key, value in env.items():
        argv += ["--setenv", key, value]
    if cfg.root_fd is not None:
        argv += ["--bind-fd", str(cfg.root_fd), "/"]
    elif cfg.root_path is not None:
        argv += ["--bind", cfg.root_path, "/"]
    else:
        raise ValueError("a root is required")
    argv += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(cfg.shm_bytes),
        "--tmpfs",
        "/dev/shm",
        "--cap-drop",
        "ALL",
        *[arg for cap in cfg.cap_add for arg in ("--cap-add", cap)],
        "--seccomp",
        str(cfg.seccomp_fd),
        "--info-fd",
        str(cfg.info_fd),
        "--chdir",
        "/",
        "--",
        *cfg.command,
    ]
    return argv


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def bwrap_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---- the launcher thread ----------------------------------------------------------


class _Launcher:
    """One daemon thread that lives as long as the process and runs every Popen."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = 0

    def _run(self) -> None:
        while True:
            fn, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed back to the caller
                future.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, name="mvm-bwrap-launcher", daemon=True)
                self._thread.start()
                self._pid = os.getpid()
        future: Future[T] = Future()
        self._queue.put((fn, future))
        return future.result()


_LAUNCHER = _Launcher()


def spawn(
    argv: list[str],
    agent_sock_fd: int,
    keep_fds: list[int],
    procs_files: list[str],
    run_as: int | None,
    log_fd: int,
) -> subprocess.Popen[bytes]:
    """Start bwrap with ``agent_sock_fd`` as fd 3, inside the cgroups, as ``run_as``.

    The pre-exec hook (between fork and exec, so bwrap and all its descendants are
    born inside) writes the pid into every ``cgroup.procs``, then drops to ``run_as``
    and puts the agent's socket on fd 3.
    """

    def launch() -> subprocess.Popen[bytes]:
        # Put a copy of the socket on fd 3 of *this* process if 3 is free, so that the
        # child inherits it there. Otherwise 3 is some other open fd here: it is passed
        # through (to keep subprocess from closing it) and replaced by dup2 in the child.
        low = fcntl.fcntl(agent_sock_fd, fcntl.F_DUPFD_CLOEXEC, AGENT_FD)
        try:
            at_three = low == AGENT_FD

            def preexec() -> None:
                pid = str(os.getpid()).encode()
                for path in procs_files:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, pid)
                    finally:
                        os.close(fd)
                if run_as is not None:
                    os.setgroups([])
                    os.setgid(run_as)
                    os.setuid(run_as)
                if not at_three:
                    os.dup2(low, AGENT_FD)
                    os.close(low)

            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=sorted({AGENT_FD, low, *keep_fds}),
                preexec_fn=preexec,
                cwd="/",
                env={"PATH": os.environ.get("PATH", SANDBOX_PATH)},
            )
        finally:
            os.close(low)

    return _LAUNCHER.call(launch)


def read_info(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    """Read bwrap's ``--info-fd`` JSON (written once the sandbox is set up, just before
    the command runs); ``None`` if bwrap exited or closed the fd first."""
    buf = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if not poller.poll(min(remaining, 0.05) * 1000):
            if proc.poll() is not None and not poller.poll(0):
                return None
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        try:
            info: dict[str, Any] = json.loads(buf)  # bwrap's --info-fd writes one JSON object
            return info
        except ValueError:
            continue
    try:
        return json.loads(buf) if buf else None
    except ValueError:
        return None
