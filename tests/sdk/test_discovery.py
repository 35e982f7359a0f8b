"""Name claims and discovery on every backend: creators racing for one name (threads and
processes), ``list``/``connect``/``mvmctl ls`` reading files only (a sandbox whose socket
is unreachable or whose supervisor is stopped is still listed, never reaped), a dead
supervisor's sandbox listed as ``lost`` until ``mvm.gc()`` / ``mvmctl gc`` removes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from waiting import wait_for

import mvm
from mvm import errors
from mvm.backends import get_backend
from mvm.osutil import pid_alive, process_stamp
from mvm.paths import names_dir, sandboxes_dir

TEMPLATE = "python-3.13"


def _mvmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mvm.cli", *args], capture_output=True, text=True, timeout=120)


def _holders_of_files_under(root: Path) -> set[int]:
    """Processes with a file open under ``root`` (a supervisor keeps its log open)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(str(root) + "/"):
                    found.add(int(entry))
                    break
            except OSError:
                continue
    return found


def _cgroups_of(sandbox_id: str) -> list[str]:
    found = subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "8", "-type", "d", "-name", f"mvm-{sandbox_id}"],
                           capture_output=True, text=True, check=False)
    return found.stdout.split()


def _mounts_mentioning(text: str) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line for line in fh if text in line]


_RACER = textwrap.dedent("""
    import os, sys, time
    import mvm
    go = sys.argv[2]
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        sb = mvm.Sandbox.create("python-3.13", backend=sys.argv[1], name=sys.argv[3], ttl="10m")
    except mvm.NameTaken as exc:
        print("NameTaken", exc.sandbox_id)
    else:
        sb.close()
        print("created", sb.id)
""")


def test_creators_racing_for_one_name_exactly_one_wins(backend: str, tmp_path: Path) -> None:
    name = f"race-{backend}"
    before = set(os.listdir(sandboxes_dir()))
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", _RACER, backend, str(go), name], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    barrier = threading.Barrier(5)
    outcomes: list[tuple[str, str | None]] = []  # ("created", id) or ("NameTaken", the holder's id)

    def create() -> None:
        barrier.wait()
        try:
            sandbox = mvm.Sandbox.create(TEMPLATE, backend=backend, name=name, ttl="10m")
        except errors.NameTaken as exc:
            outcomes.append(("NameTaken", exc.sandbox_id))
        except Exception as exc:
            outcomes.append((repr(exc), None))
        else:
            sandbox.close()
            outcomes.append(("created", sandbox.id))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    go.touch()
    barrier.wait()
    for thread in threads:
        thread.join(300)
    for proc in processes:
        out, err = proc.communicate(timeout=300)
        kind, _, sandbox_id = out.strip().partition(" ")
        outcomes.append((kind or err, sandbox_id))
    winners = [sandbox_id for kind, sandbox_id in outcomes if kind == "created"]
    assert len(outcomes) == 7 and len(winners) == 1, outcomes
    winner = winners[0]
    assert [kind for kind, _ in outcomes].count("NameTaken") == 6, outcomes
    assert all(holder == winner for kind, holder in outcomes if kind == "NameTaken"), outcomes
    # nothing half-made: one new directory, one claim, no staging left, no other supervisor
    assert set(os.listdir(sandboxes_dir())) - before == {winner}
    assert (names_dir() / name).read_text() == winner
    assert [i.id for i in mvm.Sandbox.list() if i.name == name] == [winner]
    sandbox = mvm.Sandbox.connect(name)
    supervisor = int(sandbox.describe().details["supervisor_pid"])
    assert _holders_of_files_under(sandboxes_dir()) - {supervisor} <= _holders_of_files_under(sandboxes_dir() / winner)
    sandbox.kill()
    assert not (names_dir() / name).exists()  # destroy frees the name
    assert set(os.listdir(sandboxes_dir())) == before


def test_a_claim_whose_sandbox_is_gone_is_taken_over() -> None:
    """A creator killed between claiming and publishing (or a supervisor between removing
    its directory and its claim) leaves a claim naming no sandbox: it does not block."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_staging = sandboxes_dir() / f".new-sb-0000000dead-{dead.pid}-1"
    stale_staging.mkdir()
    (names_dir() / "orphaned-claim").write_text("sb-0000000dead")
    (names_dir() / "vanished-claim").write_text("sb-00000gone0")
    with mvm.Sandbox.create(TEMPLATE, backend="namespace", name="orphaned-claim", ttl="5m") as sb:
        assert (names_dir() / "orphaned-claim").read_text() == sb.id
    mvm.gc()  # also sweeps what dead launchers left
    assert not stale_staging.exists() and not (names_dir() / "vanished-claim").exists()


def test_discovery_reads_files_only_and_never_waits_on_a_sandbox(backend: str) -> None:
    with mvm.Sandbox.create(TEMPLATE, backend=backend, name=f"quiet-{backend}", ttl="10m") as sb:
        supervisor = int(sb.describe().details["supervisor_pid"])
        sb.close()
        socket_path = sandboxes_dir() / sb.id / "control.sock"
        aside = socket_path.with_name("control.sock.aside")
        os.rename(socket_path, aside)  # unreachable: discovery must neither need nor reap it
        try:
            assert {i.id: i.state for i in mvm.Sandbox.list()}.get(sb.id) == "running"
            listed = json.loads(_mvmctl("ls", "--json").stdout)
            assert {e["id"]: e["state"] for e in listed}.get(sb.id) == "running"
            assert mvm.Sandbox.connect(sb.name).id == sb.id
        finally:
            os.rename(aside, socket_path)
        assert pid_alive(supervisor)
        os.kill(supervisor, signal.SIGSTOP)  # a stopped supervisor answers nothing
        try:
            result: list[object] = []
            reader = threading.Thread(target=lambda: result.append(mvm.Sandbox.list()), daemon=True)
            reader.start()
            reader.join(60)  # a hang guard, not a speed check
            assert result, "Sandbox.list() waited on a stopped supervisor"
            assert {i.id: i.state for i in result[0]}.get(sb.id) == "running"  # type: ignore[attr-defined]
            human = _mvmctl("ls")
            assert human.returncode == 0 and sb.id in human.stdout, human.stderr
        finally:
            os.kill(supervisor, signal.SIGCONT)
        assert sb.commands.run(["echo", "still here"]).stdout == "still here\n"


def test_a_dead_supervisor_leaves_a_lost_sandbox_until_gc(backend: str) -> None:
    name = f"doomed-{backend}"
    sandbox = mvm.Sandbox.create(TEMPLATE, backend=backend, name=name, ttl="10m")
    directory = sandboxes_dir() / sandbox.id
    details = sandbox.describe().details
    host_pids = [int(p) for p in details.get("host_pids") or []]
    os.kill(int(details["supervisor_pid"]), signal.SIGKILL)
    wait_for(lambda: not pid_alive(int(details["supervisor_pid"])), "the supervisor to die")
    assert {i.id: i.state for i in mvm.Sandbox.list()}.get(sandbox.id) == "lost"
    listed = _mvmctl("ls")
    assert any(sandbox.id in line and " lost " in line for line in listed.stdout.splitlines()), listed.stdout
    with pytest.raises(errors.SandboxLost, match="gc"):
        mvm.Sandbox.connect(name)
    with pytest.raises(errors.NameTaken, match="lost"):  # the name stays taken until gc
        mvm.Sandbox.create(TEMPLATE, backend=backend, name=name, ttl="10m")
    # a pid reused by another process does not bring it back: the start time differs
    (directory / "supervisor.pid").write_text(f"{os.getpid()} {int(process_stamp().split()[1]) + 1}")
    assert {i.id: i.state for i in mvm.Sandbox.list()}.get(sandbox.id) == "lost"
    assert directory.exists()  # listing never reaps
    # a record written before records held the isolation is listed with the backend registry's answer
    for record_file in ("state.json", "config.json"):
        record = json.loads((directory / record_file).read_text())
        assert record.pop("isolation") == get_backend(backend).isolation
        (directory / record_file).write_text(json.dumps(record))
    assert {i.id: i.isolation for i in mvm.Sandbox.list()}.get(sandbox.id) == get_backend(backend).isolation
    reaped = json.loads(_mvmctl("gc", "--json").stdout)["reaped"]
    assert [(e["id"], e["state"]) for e in reaped] == [(sandbox.id, "lost")]
    assert not directory.exists() and not (names_dir() / name).exists()
    assert sandbox.id not in [i.id for i in mvm.Sandbox.list()]
    for pid in host_pids:
        wait_for(lambda pid=pid: not pid_alive(pid), f"guest process {pid} to be gone", timeout=30)
    assert not _mounts_mentioning(sandbox.id) and not _cgroups_of(sandbox.id)
    assert mvm.gc() == []  # nothing else was lost; running sandboxes are never touched


def test_a_create_served_by_a_warm_pool_hands_its_name_claim_to_the_member() -> None:
    with mvm.pool(TEMPLATE, size=1, ttl="5m") as pool:
        member = pool.wait_ready().ready[0]
        assert (names_dir() / member).read_text() == member  # a waiting member holds its id as name
        with mvm.Sandbox.create(TEMPLATE, backend="namespace", name="pooled-name", ttl="5m") as sb:
            assert sb.id == member
            assert (names_dir() / "pooled-name").read_text() == member
            assert not (names_dir() / member).exists()
            assert mvm.Sandbox.connect("pooled-name").id == member
            with pytest.raises(errors.NameTaken):
                mvm.Sandbox.create(TEMPLATE, backend="namespace", name="pooled-name", ttl="5m")
        assert not (names_dir() / "pooled-name").exists()
    assert not [entry for entry in os.listdir(sandboxes_dir()) if member in entry]
