"""How long a VM may take to boot or restore, counted in time it could actually run.

A fixed wall-clock deadline fails healthy boots on a busy host: under TCG a cold boot is
~5 s of guest CPU here, and at a load of 15 on 2 cores QEMU gets a fraction of a CPU, so
the same boot takes over 30 s of wall time (the guest kernel was still starting its init
when the old 30 s deadline fired). So the budget is charged only with the time QEMU could
run: wall time minus the time its busiest thread spent runnable but waiting for a CPU
(``run_delay``, the second field of ``/proc/PID/task/TID/schedstat``). A guest that hangs
(spinning or idle) is charged in full and fails after ``budget`` as before; a starved one
gets the wall time it lost back — up to ``WALL_FACTOR × budget`` in all, so nothing waits
forever. Without schedstat (a kernel without ``CONFIG_SCHED_INFO``) it is plain wall time.
"""

from __future__ import annotations

import os
import time

#: However starved the VM is, a boot or restore gives up after this many times its budget.
WALL_FACTOR = 4.0


def run_delay_seconds(pid: int) -> float:
    """The longest time any thread of ``pid`` has waited on a run queue, in seconds (0 if unknown)."""
    longest = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as handle:
                fields = handle.read().split()
            longest = max(longest, int(fields[1]))
        except (OSError, IndexError, ValueError):
            continue
    return longest / 1e9


class GuestDeadline:
    """``budget`` seconds of the VM's time from now (see the module's docstring)."""

    def __init__(self, budget: float, *, started: float | None = None):
        self.budget = budget
        self.started = time.monotonic() if started is None else started
        self._pid: int | None = None
        self._delay_at_start = 0.0

    def watch(self, pid: int) -> None:
        """Charge from now on only the time QEMU ``pid`` could run."""
        self._pid = pid
        self._delay_at_start = run_delay_seconds(pid)

    def held_back(self) -> float:
        """Seconds the watched QEMU waited for a CPU since ``watch``."""
        if self._pid is None:
            return 0.0
        return max(0.0, run_delay_seconds(self._pid) - self._delay_at_start)

    def used(self) -> float:
        """Seconds charged so far: wall time minus the time QEMU was held back."""
        return time.monotonic() - self.started - self.held_back()

    def expired(self) -> bool:
        elapsed = time.monotonic() - self.started
        if elapsed <= self.budget:
            return False  # cheap: no /proc reads while within the plain budget
        return elapsed > WALL_FACTOR * self.budget or self.used() > self.budget

    @property
    def wall_limit(self) -> float:
        """The monotonic time after which it is expired however starved the VM was."""
        return self.started + WALL_FACTOR * self.budget

    def describe(self) -> str:
        """For an error: how long it waited and how much of that the host held the VM back."""
        elapsed = time.monotonic() - self.started
        held = self.held_back()
        if held < 1.0:
            return f"within {self.budget:g} s"
        return (f"within {self.budget:g} s of its own time ({elapsed:.0f} s of wall time, "
                f"{held:.0f} s of it waiting for a busy host's CPU)")
