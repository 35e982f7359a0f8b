"""Helpers for the fault tests (tests/supervisor/test_faults.py, test_agent_restart.py) and
bench/agent_restart_bench.py: finding the guest agent on the host, and a call left running
in a thread while a fault is injected."""

from __future__ import annotations

import threading
from collections.abc import Callable

import mvm
from waiting import wait_for


def agent_host_pid(sb: mvm.Sandbox) -> int:
    """The agent's pid on this host (namespace backend): the one of the sandbox's host pids
    whose innermost pid-namespace pid is the pid the agent gave in its hello."""
    details = sb.describe().details
    inner = int(details["agent"]["pid"])
    for pid in details["host_pids"]:
        try:
            with open(f"/proc/{pid}/status") as fh:
                nspids = next(line for line in fh if line.startswith("NSpid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if len(nspids) > 1 and int(nspids[-1]) == inner:
            return int(pid)
    raise AssertionError(f"no host pid of the agent (pid {inner} inside) among {details['host_pids']}")


def call_in_background(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Runs ``call`` in a daemon thread; the list gets its result or the exception it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def run_started(sb: mvm.Sandbox, seconds: int) -> tuple[threading.Thread, list[object]]:
    """A ``commands.run`` of a command that sleeps ``seconds``, in the background, returned
    once the command has started in the guest (its first output line is in the logs)."""
    started = call_in_background(lambda: sb.commands.run(["sh", "-c", f"echo started; exec sleep {seconds}"]))
    wait_for(lambda: any(e.message == "started" for e in sb.logs() if e.source.startswith("process:")),
             "the command to start", timeout=120)
    return started
