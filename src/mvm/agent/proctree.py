"""Process families from ``/proc``, and signalling them without hitting a reused pid.

A sandboxed command may fork, ``setsid`` and daemonise; a group kill must still
leave nothing running. The *family* of a process started by the agent is:

* the process itself, every process in its process group or session,
* every process still holding one of its stdio pipes,
* processes recorded as lingering when its pipes were force-closed,
* and every descendant (by parent pid) of all of the above.

The agent itself and its ancestors are never part of a family. Signals go
through a pidfd after re-checking the process's start time, so a pid that was
reused between the scan and the kill is left alone.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PROC = "/proc"
#: Signals a stopped process only acts on once continued.
TERMINATING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})


@dataclass(frozen=True)
class Stat:
    """The fields of ``/proc/<pid>/stat`` the agent needs."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int


def read_stat(pid: int) -> Stat | None:
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ..." -- comm may contain spaces and parentheses.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return Stat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def snapshot() -> dict[int, Stat]:
    """Every live process (zombies excluded) by pid."""
    table: dict[int, Stat] = {}
    try:
        names = os.listdir(PROC)
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            info = read_stat(int(name))
            if info is not None and info.state not in ("Z", "X"):
                table[info.pid] = info
    return table


def pipe_holders(inodes: Iterable[int], pids: Iterable[int]) -> set[int]:
    """The pids among ``pids`` holding an fd on one of the pipes ``inodes``."""
    wanted = {f"pipe:[{inode}]" for inode in inodes}
    holders: set[int] = set()
    if not wanted:
        return holders
    for pid in pids:
        directory = f"{PROC}/{pid}/fd"
        try:
            fds = os.listdir(directory)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{directory}/{fd}") in wanted:
                    holders.add(pid)
                    break
            except OSError:
                continue
    return holders


def protected_pids() -> set[int]:
    """The agent and its ancestors (its PID-1 parent, or whatever started it)."""
    protected = {os.getpid()}
    pid = os.getppid()
    while pid > 0 and pid not in protected:
        protected.add(pid)
        info = read_stat(pid)
        pid = info.ppid if info is not None else 0
    return protected


def descendants(seeds: Iterable[int], table: dict[int, Stat]) -> set[int]:
    """``seeds`` (those alive) and everything below them by parent pid."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    stack = [pid for pid in seeds if pid in table]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


Selector = Callable[[dict[int, Stat]], set[int]]


def family_of(root: int, pipe_inodes: Iterable[int] = (), lingering: Iterable[tuple[int, int]] = ()) -> Selector:
    """A selector for the family of ``root`` (see the module docstring)."""
    inodes = tuple(pipe_inodes)
    remembered = tuple(lingering)

    def select(table: dict[int, Stat]) -> set[int]:
        seeds = {pid for pid, info in table.items() if pid == root or info.pgrp == root or info.session == root}
        seeds |= pipe_holders(inodes, table)
        seeds |= {pid for pid, start in remembered if pid in table and table[pid].starttime == start}
        return descendants(seeds, table)

    return select


def children_of(parent: int) -> Selector:
    """A selector for every descendant of ``parent`` (not ``parent`` itself)."""

    def select(table: dict[int, Stat]) -> set[int]:
        return descendants([pid for pid, info in table.items() if info.ppid == parent], table)

    return select


def send(pid: int, starttime: int, signum: int) -> bool:
    """Signal ``pid`` only if it is still the process that started at ``starttime``."""
    pidfd = -1
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        pidfd = -1  # old kernel: fall back to kill(2) after the start-time check
    try:
        current = read_stat(pid)
        if current is None or current.starttime != starttime:
            return False
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def signal_family(select: Selector, signum: int, *, rounds: int = 20) -> int:
    """Send ``signum`` to every process ``select`` picks; returns how many were signalled.

    ``SIGKILL`` first stops the family with ``SIGSTOP`` round after round until no
    new member appears (so a fork loop cannot outrun it), then kills them all.
    Termination-style signals are followed by ``SIGCONT`` to stopped members so
    they can act on them.
    """
    protected = protected_pids()

    def members() -> dict[int, Stat]:
        table = snapshot()
        return {pid: table[pid] for pid in select(table) - protected}

    if signum != signal.SIGKILL:
        family = members()
        sent = 0
        for pid, info in family.items():
            if send(pid, info.starttime, signum):
                sent += 1
                if signum in TERMINATING and info.state == "T":
                    send(pid, info.starttime, signal.SIGCONT)
        return sent

    stopped: dict[int, Stat] = {}
    for _ in range(rounds):
        fresh = {pid: info for pid, info in members().items() if pid not in stopped}
        if not fresh:
            break
        for pid, info in fresh.items():
            send(pid, info.starttime, signal.SIGSTOP)
            stopped[pid] = info
    for pid, info in stopped.items():
        send(pid, info.starttime, signal.SIGKILL)
    # Anything that slipped through (e.g. a member that was mid-fork): kill without stopping.
    for _ in range(rounds):
        leftovers = {pid: info for pid, info in members().items()
                     if pid not in stopped or stopped[pid].starttime != info.starttime}
        if not leftovers:
            break
        for pid, info in leftovers.items():
            send(pid, info.starttime, signal.SIGKILL)
            stopped[pid] = info
        time.sleep(0.002)
    return len(stopped)
