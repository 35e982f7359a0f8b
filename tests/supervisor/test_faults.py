"""Fault injection on both backends: SIGKILL of the supervisor, and of the guest agent
(namespace: bwrap's child; VM: QEMU), in the middle of a ``commands.run``.

After each: the SDK call ends with a typed error in bounded time (never hangs), the
sandbox's host processes are gone, ``Sandbox.list`` (``mvmctl ls``) tells the truth,
and the sandbox's audit chain still verifies.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import pytest
from waiting import wait_for

import mvm
from mvm import errors
from mvm.backends import PREFERENCE, availability
from mvm.security.audit import log_path, verify

BACKENDS = [name for name in PREFERENCE if availability(name).ok] or ["namespace"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_in_background(sb: mvm.Sandbox) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(sb.commands.run(["sh", "-c", "echo started; exec sleep 300"]))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: any(e.message == "started" for e in sb.logs() if e.source.startswith("process:")),
             "the command to start", timeout=120)
    return thread, outcome


def _kill_supervisor(sb: mvm.Sandbox, details: dict) -> None:
    os.kill(int(details["supervisor_pid"]), signal.SIGKILL)


def _kill_agent_side(sb: mvm.Sandbox, details: dict) -> None:
    # namespace: bwrap and the agent under it; VM: QEMU (the guest and its agent with it)
    for pid in details["host_pids"]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


FAULTS: dict[str, Callable[[mvm.Sandbox, dict], None]] = {
    "supervisor": _kill_supervisor,
    "guest": _kill_agent_side,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_sigkill_mid_command_gives_a_typed_error_and_leaves_nothing(backend: str, fault: str) -> None:
    sb = mvm.Sandbox.create("python-3.13", backend=backend, ttl="10m")
    sandbox_id = sb.id
    try:
        details = sb.describe().details
        thread, outcome = _run_in_background(sb)
        details = sb.describe().details  # the command's processes are among host_pids now
        host_pids = [int(p) for p in details["host_pids"]] + [int(details["supervisor_pid"])]
        FAULTS[fault](sb, details)
        thread.join(60)  # bounded: the call must not wait for its 300 s command
        assert not thread.is_alive(), f"commands.run hung after the {fault} was killed"
        assert isinstance(outcome[0], errors.MvmError), outcome
        assert isinstance(outcome[0], (errors.SandboxError, errors.InvalidState, errors.SandboxNotFound)), outcome
        if fault == "guest":  # the supervisor survives and says what happened
            info = sb.describe()
            assert info.state == "error", info.state
            assert "agent" in str(info.details.get("error")), info.details
    finally:
        try:
            sb.kill()
        except errors.MvmError:
            pass
    # nothing of it is left running, and the listing is true
    wait_for(lambda: not any(_alive(pid) for pid in host_pids), "the sandbox's host processes to be gone",
             timeout=60)
    assert sandbox_id not in [info.id for info in mvm.Sandbox.list()]
    verify(log_path(sandbox_id), sandbox_id=sandbox_id)  # the audit chain still verifies
