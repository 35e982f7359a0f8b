"""Auto-pause on idle and the transparent resume (``auto_pause``, opt-in per sandbox).

A sandbox is *idle* when, for its whole ``auto_pause`` period, all of these held:

* no request in flight on its control socket: a running ``commands.run``, an attached
  process stream (``proc.attach``/``proc.wait``), a log follow, a file transfer all
  count, whoever sent them;
* no open port forward (a server behind a forward must answer its next client at once,
  so a forward keeps the sandbox awake until it is closed);
* no open TCP stream through the supervisor (a forward's connection, or the guest's own
  egress through the proxy: a download in progress is not frozen);
* no request that works on the guest started. Reads of the supervisor's own record
  (``ping``, ``sandbox.describe``, ``sandbox.logs``, ``port.list``, ``proc.info``) and
  ``sandbox.pause``/``resume``/``destroy``/``port.close`` neither wake a sandbox nor reset the clock,
  so polling a sandbox's state does not keep it running.

Processes running in the guest with none of the above (a background job nobody watches)
do not keep it awake: they are frozen with the rest and go on, state intact, when the
next request resumes the sandbox. The TTL keeps counting while paused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import MvmError

if TYPE_CHECKING:
    from .server import Supervisor

#: Ops that neither wake an idle-paused sandbox nor count as activity (see above).
QUIET_OPS = frozenset({
    "ping", "sandbox.describe", "sandbox.logs", "port.list", "proc.info",
    "sandbox.pause", "sandbox.resume", "sandbox.destroy", "port.close",
})


class IdleWatch:
    """The supervisor's idle clock; pauses after ``seconds`` idle (None: never)."""

    def __init__(self, sup: Supervisor, seconds: int | None) -> None:
        self.sup = sup
        self.seconds = seconds
        # One lock for the count and the pause/resume decision: a request counted before
        # the watcher looks stops the pause; one counted after it finds the sandbox
        # paused by idleness and resumes it before going on.
        self._lock = threading.RLock()
        self._in_flight = 0
        self._last_active = time.monotonic()
        self.paused_by_idle = False

    def start(self, seconds: int | None) -> None:
        """Watch from now on with ``seconds`` (a pooled sandbox learns it when claimed)."""
        with self._lock:
            self.seconds = seconds
            self._last_active = time.monotonic()
        if seconds is not None:
            threading.Thread(target=self.watch, name="mvm-idle", daemon=True).start()

    def describe(self) -> dict[str, Any]:
        return {"auto_pause_seconds": self.seconds, "paused_by_idle": self.paused_by_idle}

    @contextmanager
    def request(self, op: str) -> Iterator[None]:
        """Around every request: counted while in flight; a working request wakes the sandbox."""
        active = op not in QUIET_OPS
        with self._lock:
            self._in_flight += 1
            if active:
                self._last_active = time.monotonic()
                if self.paused_by_idle:
                    self._resume(op)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                if active:
                    self._last_active = time.monotonic()

    def paused_by_user(self) -> None:
        """An explicit pause or resume: the sandbox's state is the caller's from now on."""
        with self._lock:
            self.paused_by_idle = False
            self._last_active = time.monotonic()

    def watch(self) -> None:
        if self.seconds is None:
            return
        step = min(1.0, self.seconds / 4)
        while not self.sup.destroyed.wait(step):
            with self._lock:
                if self._idle():
                    self._pause()

    def _idle(self) -> bool:
        assert self.seconds is not None
        sup = self.sup
        return (sup.state == "running" and self._in_flight == 0 and not sup.network.forwards.list()
                and sup.network.open_streams() == 0 and time.monotonic() - self._last_active >= self.seconds)

    def _pause(self) -> None:
        sup = self.sup
        assert sup.instance is not None
        args = {"idle_seconds": self.seconds}
        try:
            sup.on_backend(sup.instance.pause)
        except MvmError as exc:  # (the backend left it running): try again after another idle period
            self._last_active = time.monotonic()
            sup.logs.system(f"auto_pause failed, the sandbox runs on: {exc.message}",
                            sup.audit.record("sandbox.auto_pause", args, outcome="error", error_type=exc.wire_type))
            return
        sup.set_state("paused")
        self.paused_by_idle = True
        sup.logs.system(f"sandbox paused: idle for {self.seconds} s (auto_pause)",
                        sup.audit.record("sandbox.auto_pause", args))

    def _resume(self, op: str) -> None:
        sup = self.sup
        self.paused_by_idle = False
        if sup.state != "paused":
            return
        sup.resume_instance()
        sup.logs.system(f"sandbox resumed by {op} (auto_pause)",
                        sup.audit.record("sandbox.auto_resume", {"op": op}))
