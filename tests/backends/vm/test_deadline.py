"""The VM boot/restore deadline is charged only with time QEMU could run (deadline.py):
a process starved by a busy host gets the wall time it lost back, an idle or hung one
does not, and nothing waits past WALL_FACTOR × the budget. Real processes, real scheduler."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from waiting import wait_for

from mvm.backends.vm.deadline import WALL_FACTOR, GuestDeadline, run_delay_seconds

SPIN = [sys.executable, "-c", "while True: pass"]


@pytest.fixture
def one_cpu() -> int:
    """A CPU this test may pin its processes to (the first one it is allowed on)."""
    return min(os.sched_getaffinity(0))


def _pinned(cpu: int, command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))


@pytest.fixture
def starved(one_cpu: int) -> Iterator[subprocess.Popen[bytes]]:
    """A busy process sharing its CPU with three other busy ones: it waits ~3/4 of the time."""
    procs = [_pinned(one_cpu, SPIN) for _ in range(4)]
    try:
        yield procs[0]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_starved_process_is_charged_only_with_the_time_it_ran(starved: subprocess.Popen[bytes]) -> None:
    deadline = GuestDeadline(1.0)
    deadline.watch(starved.pid)
    wait_for(lambda: time.monotonic() - deadline.started > 2.0, "two budgets of wall time", timeout=10)
    assert deadline.held_back() > 1.0  # it waited for its CPU most of that time
    assert not deadline.expired()  # so the budget is not used up yet
    assert "waiting for a busy host's CPU" in deadline.describe()
    wait_for(deadline.expired, "the budget to run out in the time it could run", timeout=60)


def test_an_idle_process_is_charged_in_full() -> None:
    idle = subprocess.Popen(["sleep", "60"])
    try:
        deadline = GuestDeadline(0.3)
        deadline.watch(idle.pid)
        wait_for(deadline.expired, "an idle process's budget to run out", timeout=10)
        assert deadline.held_back() < 0.3  # expired on its own time, not by the wall-time cap
        assert deadline.describe() == "within 0.3 s"
    finally:
        idle.kill()
        idle.wait()


def test_however_starved_it_gives_up_after_wall_factor_budgets(starved: subprocess.Popen[bytes]) -> None:
    deadline = GuestDeadline(0.5)
    deadline.watch(starved.pid)
    assert deadline.wall_limit == pytest.approx(deadline.started + WALL_FACTOR * 0.5)
    wait_for(deadline.expired, "the wall-time cap", timeout=30)


def test_without_a_process_it_is_plain_wall_time() -> None:
    deadline = GuestDeadline(0.2)
    assert deadline.held_back() == 0.0
    wait_for(deadline.expired, "0.2 s of wall time", timeout=10)


def test_run_delay_of_a_gone_process_is_zero() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert run_delay_seconds(proc.pid) == 0.0
