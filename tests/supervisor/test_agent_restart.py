"""The guest agent killed with SIGKILL while the sandbox runs: the guest's init starts a
new agent and the sandbox goes on (docs/reliability.md, "Agent restart").

The real agent process is killed: in a VM from inside the guest (the host cannot see
guest pids), in a namespace sandbox from the host by its host pid. Then: the request in
flight ends with a typed error naming the restart, later requests work, files written
before are there, the processes the dead agent ran are reported ended (and are gone),
``describe()`` counts the restart, ``ls`` says running, the audit chain records the
restart and verifies. An agent that keeps dying ends the sandbox as before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from sandbox_faults import agent_host_pid, run_started
from waiting import wait_for

import mvm
from mvm import errors
from mvm.agent import MAX_AGENT_RESTARTS
from mvm.backends import PREFERENCE, availability
from mvm.osutil import pid_alive
from mvm.security.audit import log_path, verify

BACKENDS = [name for name in PREFERENCE if availability(name).ok] or ["namespace"]


def _kill_agent(sb: mvm.Sandbox, backend: str) -> None:
    """SIGKILL the real agent process (and wait until it is gone, where the host can see it)."""
    if backend == "vm":
        inner = int(sb.describe().details["agent"]["pid"])
        try:
            sb.commands.start(["sh", "-c", f"kill -KILL {inner}"])
        except mvm.errors.SandboxError as exc:  # the agent died before it answered this start
            assert "restarted" in exc.message, exc.message
        return
    pid = agent_host_pid(sb)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), "the killed agent to be gone", timeout=30)


def _restarted(sb: mvm.Sandbox, count: int) -> bool:
    return int(sb.describe().details["agent_restarts"]) >= count


def _audit_ops(sandbox_id: str) -> list[str]:
    with open(log_path(sandbox_id)) as fh:
        return [json.loads(line)["op"] for line in fh if line.strip()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_agent_is_restarted_and_the_sandbox_goes_on(backend: str) -> None:
    with mvm.Sandbox.create("python-3.13", backend=backend, ttl="10m") as sb:
        sb.files.write("/w/before", b"written before the agent died")
        old_agent = sb.describe().details["agent"]["pid"]
        sleeper = sb.commands.start(["sleep", "300"])
        thread, outcome = run_started(sb, 301)

        _kill_agent(sb, backend)

        thread.join(120)  # a hang guard: the call must not wait for its 301 s command
        assert not thread.is_alive(), "commands.run hung after the agent was killed"
        assert isinstance(outcome[0], errors.SandboxError), outcome
        assert "agent died and was restarted" in outcome[0].message, outcome[0].message
        # later requests work (they wait for the new agent's hello), files written before are there
        assert sb.files.read("/w/before") == b"written before the agent died"
        assert sb.commands.run(["sh", "-c", "echo after"]).stdout == "after\n"
        info = sb.describe()
        assert info.state == "running", info.details.get("error")
        assert info.details["agent_restarts"] == 1
        assert info.details["agent"]["pid"] != old_agent
        # the processes the dead agent ran are reported ended, and are gone from the guest
        with pytest.raises(errors.SandboxError, match="restarted"):
            sleeper.wait(timeout=60)
        assert not sleeper.is_running()
        guest_sleeps = sb.commands.run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]).stdout
        assert "sleep 300" not in guest_sleeps and "sleep 301" not in guest_sleeps, guest_sleeps
        assert {i.id: i.state for i in mvm.Sandbox.list()}[sb.id] == "running"
        sandbox_id = sb.id
    ops = _audit_ops(sandbox_id)
    assert "agent.restart" in ops, ops
    chain = verify(log_path(sandbox_id), sandbox_id=sandbox_id)
    assert chain.ok, chain


def _give_out_next(sb: mvm.Sandbox, backend: str, pid: int) -> None:
    """Make ``pid`` the next pid the guest's pid namespace gives out (``ns_last_pid``): in a
    VM from inside (the guest's root may), in a namespace sandbox from the host, entering
    the sandbox's user and pid namespaces (its processes have no CAP_SYS_ADMIN)."""
    script = f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid"  # (echo is a builtin: no fork after it)
    if backend == "vm":
        sb.commands.run(["sh", "-c", script], check=True)
    else:
        subprocess.run(["nsenter", "-t", str(agent_host_pid(sb)), "-U", "-p", "sh", "-c", script], check=True)


def _started_with_pid(sb: mvm.Sandbox, backend: str, pid: int, argv: list[str]) -> mvm.Process:
    """Start ``argv`` as ``pid`` (a pid the dead agent's process had): another fork in the
    guest between setting and starting takes it, so try a few times."""
    for _ in range(5):
        _give_out_next(sb, backend, pid)
        process = sb.commands.start(argv)
        if process.pid == pid:
            return process
        process.kill()
    raise AssertionError(f"the guest did not give out pid {pid} again")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pid_reused_after_an_agent_restart_names_the_new_process_only(backend: str) -> None:
    """A restarted agent's process that gets the pid of a dead agent's process: its output
    and exit are its own, the old handle still tells the old process's end and cannot
    signal or feed the new one (a typed error says the process ended with its agent)."""
    with mvm.Sandbox.create("python-3.13", backend=backend, ttl="10m") as sb:
        old = sb.commands.start(["sleep", "300"], stdin=True)
        assert old.pid is not None
        _kill_agent(sb, backend)
        wait_for(lambda: _restarted(sb, 1), "the agent restart", timeout=120)
        wait_for(lambda: sb.commands.run(["test", "-d", f"/proc/{old.pid}"]).exit_code != 0,
                 "the dead agent's process to be gone", timeout=60)

        # a command run to completion as the reused pid: its own output and exit status
        for _ in range(5):
            _give_out_next(sb, backend, old.pid)
            run = sb.commands.run(["sh", "-c", "echo fresh; exit 7"])
            if run.pid == old.pid:
                break
        assert (run.pid, run.exit_code, run.stdout) == (old.pid, 7, "fresh\n")

        new = _started_with_pid(sb, backend, old.pid, ["sh", "-c", "echo new; exec sleep 300"])
        assert next(new.output()) == ("stdout", "new\n")
        assert new.agent_generation != old.agent_generation
        # the old handle: the old process's end, not the new one's
        with pytest.raises(errors.SandboxError, match="restarted"):
            old.wait(timeout=30)
        assert not old.is_running() and old.info().argv == ["sleep", "300"]
        with pytest.raises(errors.ProcessNotFound, match=f"pid {old.pid} ended with the guest agent that ran it"):
            old.kill()
        with pytest.raises(errors.ProcessNotFound, match="ended with the guest agent"):
            old.send_stdin("for the old process")
        # the new process was not touched, and is the one its pid names now
        assert new.is_running()
        assert sb.commands.connect(old.pid).argv == new.argv
        new.kill()
        assert new.wait(timeout=60) == 128 + signal.SIGKILL
        assert list(new.output()) == [("stdout", "new\n")]


MiB = 1 << 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_agent_killed_mid_frame_leaves_a_clean_channel_to_the_next(backend: str) -> None:
    """Killed while it streams a 32 MiB file to the host (frames half sent): the read fails
    naming the restart, and the new agent's answers are read whole and right."""
    data = os.urandom(32 * MiB)
    with mvm.Sandbox.create("python-3.13", backend=backend, ttl="10m") as sb:
        sb.files.write("/w/big", data)
        agent = int(sb.describe().details["agent"]["pid"])
        # In the guest: kill the agent once it has read 4 MiB more than now -- in the middle
        # of the read below (it reads ahead of what the host has taken by a bounded amount).
        sb.commands.start(["sh", "-c", f"start=$(awk '/^rchar/ {{print $2}}' /proc/{agent}/io); "
                           f"while [ $(awk '/^rchar/ {{print $2}}' /proc/{agent}/io) -lt $((start + {4 * MiB})) ]; "
                           f"do :; done; kill -KILL {agent}"])
        with pytest.raises(errors.SandboxError, match="agent died and was restarted"):
            sb.files.read("/w/big", max_bytes=64 * MiB)
        assert sb.files.read("/w/big", max_bytes=64 * MiB) == data
        assert sb.describe().details["agent_restarts"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_agent_that_keeps_dying_ends_the_sandbox(backend: str) -> None:
    sb = mvm.Sandbox.create("python-3.13", backend=backend, ttl="10m")
    sandbox_id = sb.id
    host_pids: list[int] = []
    try:
        for restart in range(1, MAX_AGENT_RESTARTS + 1):
            _kill_agent(sb, backend)
            wait_for(lambda count=restart: _restarted(sb, count), f"agent restart {restart}", timeout=120)
            assert sb.commands.run(["true"]).exit_code == 0
        details = sb.describe().details
        host_pids = [*details["host_pids"], int(details["supervisor_pid"])]
        _kill_agent(sb, backend)  # one death more than the guest's init and the supervisor allow
        wait_for(lambda: sb.describe().state == "error", "the sandbox to end in error", timeout=120)
        info = sb.describe()
        assert "agent" in str(info.details["error"]), info.details
        with pytest.raises((errors.SandboxError, errors.InvalidState)):
            sb.commands.run(["true"])
    finally:
        try:
            sb.kill()
        except errors.MvmError:
            pass
    wait_for(lambda: not any(pid_alive(pid) for pid in host_pids), "the sandbox's host processes to be gone",
             timeout=60)
    assert sandbox_id not in [i.id for i in mvm.Sandbox.list()]
    ops = _audit_ops(sandbox_id)
    assert ops.count("agent.restart") == MAX_AGENT_RESTARTS, ops
    assert verify(log_path(sandbox_id), sandbox_id=sandbox_id).ok
