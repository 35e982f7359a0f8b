"""How long a sandbox is unusable after its guest agent is SIGKILLed (docs/reliability.md).

Per backend: ``--sandboxes`` sandboxes; in each, the median of ``--calls`` plain
``commands.run(["true"])`` first (the baseline), then the agent is killed as many times as it
may be restarted (``MAX_AGENT_RESTARTS``), each time timing from the kill to the next
successful ``commands.run(["true"])``. Printed: median and max of those, and their ratio to
the baseline measured in the same run.

The kill: a VM's agent from inside the guest (``kill -KILL <pid>`` started as a command: the
host cannot see guest pids; the time includes starting that command); a namespace agent
from the host by its host pid.

    .venv/bin/python bench/agent_restart_bench.py [--backend vm|namespace ...] [--sandboxes 2] [--calls 20]

Runs in a throw-away MVM_HOME (templates and caches shared with ~/.mvm).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
os.environ["MVM_HOME"] = tempfile.mkdtemp(prefix="mvmb-", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["MVM_HOME"], True)

import mvm  # noqa: E402  (after MVM_HOME is chosen)
from mvm.agent import MAX_AGENT_RESTARTS  # noqa: E402
from mvm.backends import availability  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox_faults import agent_host_pid  # noqa: E402  (shared with the fault tests)


def kill_agent(sb: mvm.Sandbox, backend: str) -> float:
    """SIGKILL the agent; returns the moment of the kill (monotonic)."""
    if backend == "vm":
        inner = int(sb.describe().details["agent"]["pid"])
        started = time.monotonic()
        try:
            sb.commands.start(["sh", "-c", f"kill -KILL {inner}"])
        except mvm.errors.SandboxError as exc:  # the agent died before it answered this start
            assert "restarted" in exc.message, exc.message
        return started
    pid = agent_host_pid(sb)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return started


def until_next_success(sb: mvm.Sandbox, killed_at: float, restarts_before: int) -> float:
    """The first ``commands.run(["true"])`` that succeeds after the restart was noticed."""
    while True:
        try:
            if sb.commands.run(["true"]).exit_code == 0 and \
                    sb.describe().details["agent_restarts"] > restarts_before:
                return time.monotonic() - killed_at
        except mvm.errors.SandboxError:
            pass  # the call that met the dying agent; the next one waits for the new agent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", action="append", choices=["vm", "namespace"])
    parser.add_argument("--sandboxes", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20)
    options = parser.parse_args()
    backends = [b for b in (options.backend or ["namespace", "vm"]) if availability(b).ok]
    print(f"{'backend':<10} {'baseline run ms':>15} {'kill->next ok ms (median)':>26} {'max':>8} {'ratio':>7}"
          f" {'restarts':>8}")
    for backend in backends:
        baselines: list[float] = []
        recoveries: list[float] = []
        for _ in range(options.sandboxes):
            with mvm.Sandbox.create("python-3.13", backend=backend, ttl="10m") as sb:
                for _ in range(options.calls):
                    started = time.monotonic()
                    sb.commands.run(["true"])
                    baselines.append(time.monotonic() - started)
                for before in range(MAX_AGENT_RESTARTS):
                    recoveries.append(until_next_success(sb, kill_agent(sb, backend), before))
                assert sb.describe().details["agent_restarts"] == MAX_AGENT_RESTARTS
        base = statistics.median(baselines) * 1000
        recovery = statistics.median(recoveries) * 1000
        print(f"{backend:<10} {base:>15.1f} {recovery:>26.1f} {max(recoveries) * 1000:>8.1f} {recovery / base:>7.1f}"
              f" {len(recoveries):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
