"""Starting QEMU so it never outlives its supervisor, and finding it again after a crash.

* Its own session/process group (``setsid``): a terminal's Ctrl-C aimed at the
  supervisor does not reach it, and the whole group can be signalled.
* ``PR_SET_PDEATHSIG=SIGKILL``: the kernel kills QEMU when its parent dies.
  The signal is tied to the *thread* that forked, so every QEMU is forked from
  one long-lived spawner thread, never from a short-lived worker thread.
* Pids are recorded together with their start time (``/proc/<pid>/stat``
  field 22) so cleanup never kills an unrelated process that reused the pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...osutil import process_start_time

_PR_SET_PDEATHSIG = 1
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mvm-qemu-spawner")
        return _spawner


def _preexec(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def spawn(argv: list[str], log_path: Path, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached from our terminal, stdout/stderr appended to ``log_path``;
    ``pass_fds`` stay open in it under the same numbers."""

    parent = os.getpid()

    def run_checked() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: _preexec(parent),
                close_fds=True,
                pass_fds=pass_fds,
            )

    return _executor().submit(run_checked).result()


def is_same_process(pid: int, started: int | None) -> bool:
    return started is not None and process_start_time(pid) == started


def terminate(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaps it."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def kill_recorded(pid: int, started: int | None, grace: float = 2.0) -> None:
    """Kill a process known only by pid + start time (an orphan from a dead supervisor)."""
    if not is_same_process(pid, started):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_same_process(pid, started):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
