"""Helpers for the fault tests (tests/supervisor/test_faults.py, test_agent_restart.py) and
bench/agent_restart_bench.py: finding the guest agent on the host, a call left running in a
thread while a fault is injected, the conditions that say a write or a snapshot save or
restore is under way, and the check that no partial snapshot is left."""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import Callable

import mvm
from mvm import paths
from mvm.snapshots import SnapshotStore
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


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``, as the host sees them now."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def guest_pids(supervisor_pid: int) -> list[int]:
    """The guest side as it is right now (a restore starts a new one): QEMU, or bwrap
    and the agent under it."""
    return [pid for pid in descendants(supervisor_pid) if _comm(pid) in ("bwrap", "qemu-system-x86")]


def snapshot_in_progress(kind: str) -> Callable[[], bool]:
    """Whether the supervisor is in the middle of writing a snapshot (``staging``) or
    unsealing one for a restore (``restore``): its private directory in the store has bytes."""
    root = paths.snapshots_dir()

    def check() -> bool:
        for entry in root.glob(f".{kind}-snap_*"):
            try:
                if any(f.is_file() and f.stat().st_size > 0 for f in entry.rglob("*")):
                    return True
            except OSError:
                continue
        return False

    return check


def write_under_way(sb: mvm.Sandbox, path: str = "/w/big") -> Callable[[], bool]:
    """Whether a ``files.write`` to ``path`` is under way: the agent's temp file beside it grows."""
    def check() -> bool:  # the agent's temp file is growing (asked over the same connection)
        directory, name = posixpath.split(path)
        return any(e.name.startswith(f".{name}.mvm-") and e.size > 0 for e in sb.files.list(directory))
    return check


def assert_snapshots_whole() -> None:
    """No partial snapshot: every listed one verifies, nothing half-written or unsealed stays."""
    store = SnapshotStore()
    for info in store.list():
        store.verify(info.id)
    assert not store.problems()
    assert not list(store.root.glob(".staging-*")) and not list(store.root.glob(".restore-*"))
