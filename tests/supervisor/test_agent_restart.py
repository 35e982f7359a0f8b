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
import secrets
import signal
import subprocess
import threading

import pytest
from sandbox_faults import (agent_host_pid, assert_snapshots_whole, call_in_background, descendants, run_started,
                             snapshot_in_progress, write_under_way)
from waiting import wait_for

import mvm
from mvm import errors, paths
from mvm.agent import MAX_AGENT_RESTARTS
from mvm.backends import PREFERENCE, availability
from mvm.osutil import pid_alive
from mvm.security.audit import log_path, verify
from mvm.snapshots import SnapshotStore

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


# ---- the agent killed mid files.write, snapshot save, restore ---------------------------


def _arm_guest_killer(sb: mvm.Sandbox) -> None:
    """VM: a guest process that SIGKILLs the agent the moment the agent reads anything more
    (the next request from the host: a snapshot's ``fs.sync``, the hello after a restore).
    Its output goes to /dev/null (the agent reading it would count), and it tells the host
    it is armed on the serial console, which the host reads from a file: no agent call."""
    agent = int(sb.describe().details["agent"]["pid"])
    marker = f"armed-{secrets.token_hex(4)}"
    rchar = f"awk '/^rchar/ {{print $2}}' /proc/{agent}/io"
    sb.commands.start(["sh", "-c", f"exec >/dev/null 2>&1 </dev/null; r0=$({rchar}); echo {marker} >/dev/console; "
                       f"while [ \"$({rchar})\" = \"$r0\" ]; do :; done; kill -KILL {agent}"])
    console = paths.sandboxes_dir() / sb.id / "backend" / "console.log"
    wait_for(lambda: marker in console.read_text(errors="replace"), "the guest killer to arm", timeout=120)


def _new_agent_host_pid(supervisor_pid: int, old: set[int]) -> int | None:
    """Namespace: the host pid of an agent started since ``old`` was taken (the keeper's
    child: the keeper and its agent run the same command line)."""
    pids = set(descendants(supervisor_pid))
    for pid in pids - old:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read()
            with open(f"/proc/{parent}/cmdline", "rb") as fh:
                parent_argv = fh.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent in pids and argv == parent_argv and b"mvm-agent" in argv and b"bwrap" not in argv:
            return pid
    return None


def _save_killing_the_agent(sb: mvm.Sandbox, store: SnapshotStore) -> tuple[threading.Thread, list[object]]:
    """Namespace: ``snapshot("cut")`` in the background, the agent SIGKILLed from the host
    once the store's staging directory has bytes; a save that ended first is removed and
    taken again."""
    agent = agent_host_pid(sb)
    under_way = snapshot_in_progress("staging")
    for _attempt in range(10):
        thread, outcome = call_in_background(lambda: sb.snapshot("cut"))
        wait_for(lambda saving=thread: under_way() or not saving.is_alive(), "the snapshot save to be under way",
                 timeout=120, interval=0.002)
        if thread.is_alive():
            os.kill(agent, signal.SIGKILL)
            return thread, outcome
        thread.join()
        assert isinstance(outcome[0], mvm.Snapshot), outcome
        store.remove(outcome[0].id)
    raise AssertionError("no snapshot save was caught under way in 10 tries")


def _first_new_agent(thread: threading.Thread, supervisor_pid: int, old: set[int]) -> int | None:
    """The host pid of the first agent started since ``old`` while ``thread`` runs, or None."""
    found: list[int | None] = [None]

    def appeared() -> bool:
        found[0] = _new_agent_host_pid(supervisor_pid, old)
        return found[0] is not None or not thread.is_alive()

    wait_for(appeared, "the restored guest's agent to start", timeout=120, interval=0.001)
    return found[0]


def _resume_killing_the_new_agent(sb: mvm.Sandbox, supervisor_pid: int,
                                  snapshot: str) -> tuple[threading.Thread, list[object]]:
    """Namespace: ``resume(snapshot)`` in the background, its new guest's agent SIGKILLed
    while the restore is under way: the supervisor is SIGSTOPped once the agent appears,
    and if the restore got as far as its audit entry, it is let go and tried again."""
    for _attempt in range(10):
        old = set(descendants(supervisor_pid))
        restores = _audit_ops(sb.id).count("snapshot.restore")
        thread, outcome = call_in_background(lambda: sb.resume(snapshot))
        agent = _first_new_agent(thread, supervisor_pid, old)
        if agent is not None:
            os.kill(supervisor_pid, signal.SIGSTOP)
            if _audit_ops(sb.id).count("snapshot.restore") == restores:  # still under way
                os.kill(agent, signal.SIGKILL)
                wait_for(lambda pid=agent: not pid_alive(pid), "the killed agent to be gone", timeout=30)
                os.kill(supervisor_pid, signal.SIGCONT)
                return thread, outcome
            os.kill(supervisor_pid, signal.SIGCONT)
        thread.join(120)
        assert not thread.is_alive() and not isinstance(outcome[0], Exception), outcome
    raise AssertionError("no restore was caught under way in 10 tries")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage", ["write", "save", "restore"])
def test_an_agent_killed_mid_write_save_or_restore_is_restarted(backend: str, stage: str) -> None:
    """The guest agent process SIGKILLed in the middle of a 64 MiB ``files.write``, a
    snapshot save, or a restore: the call ends (a typed error naming the restart, or whole
    when the agent's part was done), the agent is restarted and the sandbox goes on, with
    the files it had; no partial snapshot, earlier ones verify; the audit chain verifies."""
    store = SnapshotStore()
    with mvm.Sandbox.create("python-3.13", backend=backend, ttl="10m") as sb:
        sb.files.write("/w/before", b"written before the agent died")
        details = sb.describe().details
        supervisor_pid = int(details["supervisor_pid"])
        base = None
        if stage == "write":
            thread, outcome = call_in_background(lambda: sb.files.write("/w/big", os.urandom(64 * MiB)))
            wait_for(write_under_way(sb), "the 64 MiB write to be under way", timeout=120, interval=0.01)
            _kill_agent(sb, backend)
        elif stage == "save":
            if backend == "vm":
                _arm_guest_killer(sb)  # fires on the save's fs.sync
                thread, outcome = call_in_background(lambda: sb.snapshot("cut"))
            else:
                sb.files.write("/w/state", os.urandom(32 * MiB))  # (enough that saving takes a while)
                thread, outcome = _save_killing_the_agent(sb, store)
        else:
            if backend == "vm":
                _arm_guest_killer(sb)  # in the snapshot: fires in the restored guest, on the hello
                sb.pause()  # (a paused sandbox is saved without an fs.sync: the killer stays armed)
                base = sb.snapshot("base", keep=True)
                thread, outcome = call_in_background(lambda: sb.resume("base"))
            else:
                base = sb.snapshot("base", keep=True)
                thread, outcome = _resume_killing_the_new_agent(sb, supervisor_pid, base.id)
        thread.join(120)  # a hang guard, not a speed check
        assert not thread.is_alive(), f"the {stage} hung after the agent was killed"
        result = outcome[0]
        print(f"{stage} on {backend}: {result!r}"[:300])
        if isinstance(result, Exception):
            assert isinstance(result, (errors.SandboxError, errors.InvalidArgument)), result
        # the agent is restarted and the sandbox goes on
        wait_for(lambda: _restarted(sb, 1), "the agent restart", timeout=120)
        assert sb.commands.run(["sh", "-c", "echo after"]).stdout == "after\n"
        info = sb.describe()
        assert info.state == "running", info.details.get("error")
        assert info.details["agent_restarts"] == 1, info.details
        assert sb.files.read("/w/before") == b"written before the agent died"
        left = sorted(entry.name for entry in sb.files.list("/w"))
        print(f"{stage} on {backend}: left in /w: {left}")
        if stage == "write":
            # never a half-written target: the whole file, or none
            assert "big" not in left or len(sb.files.read("/w/big", max_bytes=64 * MiB)) == 64 * MiB, left
        # and no temp file of the cut write: the new agent removed it (agent.files.PendingTemps)
        assert set(left) <= {"before", "big", "state"}, left
        assert {i.id: i.state for i in mvm.Sandbox.list()}[sb.id] == "running"
        assert_snapshots_whole()
        saved = [i for i in store.list() if i.name == "cut"]
        if stage == "save":
            assert bool(saved) == (not isinstance(result, Exception)), (saved, result)
        # a whole snapshot restores and runs (not a VM's base: its guest killer would fire again)
        for snap in saved + ([base] if base is not None and backend != "vm" else []):
            with mvm.Sandbox.create("python-3.13", backend=backend, from_snapshot=snap.id, ttl="10m") as again:
                assert again.files.read("/w/before") == b"written before the agent died"
                assert again.commands.run(["true"]).exit_code == 0
        sandbox_id = sb.id
    if isinstance(result, Exception) and stage != "restore":  # (a restore's own hello may be what failed)
        # the dead agent's calls name its death (a save whose memory image may hold a guest
        # without its agent is not kept); a chunk that reached the new agent finds its handle gone
        assert ("the guest agent died" in result.message
                or "dropped when the host reconnected" in result.message), result.message
    if base is not None:
        store.remove(base.id)
    assert "agent.restart" in _audit_ops(sandbox_id)
    chain = verify(log_path(sandbox_id), sandbox_id=sandbox_id)
    assert chain.ok, chain
