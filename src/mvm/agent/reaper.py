"""The one place in the agent that waits for children: the reaper thread (PID 1, the
agent's keeper, waits for its own in ``keeper``).

The agent is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so orphans of the
processes it started are re-parented to it; the reaper collects every child's
exit status, reports the ones the agent started and drops the rest.

Nothing else may call ``wait``: spawning happens under ``Reaper.lock`` (see
``processes``), so a child always has its record before the reaper can see it
exit, and ``subprocess.Popen``'s own waits never race with this thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("mvm.agent")

ExitHandler = Callable[[int, int], None]


class Reaper(threading.Thread):
    """Blocks in ``waitid(WNOWAIT)`` until a child exits, then reaps all that have."""

    def __init__(self, on_exit: ExitHandler):
        super().__init__(name="mvm-reaper", daemon=True)
        self.lock = threading.Lock()
        self._on_exit = on_exit
        self._have_children = threading.Event()

    def child_started(self) -> None:
        """Wake the reaper if it was idle because there were no children."""
        self._have_children.set()

    def run(self) -> None:
        while True:
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                self._have_children.wait(1.0)
                self._have_children.clear()
                continue
            except InterruptedError:
                continue
            self.reap_ready()

    def reap_ready(self) -> None:
        """Collect every exited child without blocking."""
        with self.lock:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                try:
                    self._on_exit(pid, status)
                except Exception:  # never let a bookkeeping bug stop the reaping
                    log.exception("exit handler failed for pid %d", pid)


def exit_code_of(status: int) -> tuple[int, int | None]:
    """``(exit_code, signal)`` from a wait status: a signal death is ``128 + signal``."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return 128 - code, -code
    return code, None
