"""One pause/resume/snapshot/restore cycle with the sandbox's file and process state
checked after each step (shared by tests/sdk/test_cycles.py and bench/cycles_bench.py).

Users reported changes lost after the second resume: every cycle writes new state,
checks *all* the state written so far after the resume and after the restore, and
checks that a change made after the snapshot is undone by the restore.
"""

from __future__ import annotations

import mvm
from mvm.snapshots import SnapshotStore


class Cycler:
    """Runs cycle after cycle on one sandbox; ``keeper`` is a process that must survive
    every pause/resume (and, on a VM, every restore: the memory image holds it)."""

    def __init__(self, sb: mvm.Sandbox):
        self.sb = sb
        self.full = sb.describe().backend == "vm"  # namespace snapshots hold the file system only
        self.store = SnapshotStore()
        self.previous: str | None = None
        self.keeper = self._start_keeper()
        self.done = 0

    def _start_keeper(self) -> int:
        return self.sb.commands.start(["sleep", "100000"]).pid

    def _check(self, i: int, where: str) -> None:
        sb = self.sb
        log = sb.files.read("/w/log").decode().split()
        assert log == [str(n) for n in range(i + 1)], f"cycle {i}, {where}: the log lost lines: {log[-3:]}"
        assert sb.files.read(f"/w/f-{i}") == str(i).encode(), f"cycle {i}, {where}"
        alive = sb.commands.run(["sh", "-c", f"test -d /proc/{self.keeper} && echo alive"]).stdout
        assert alive == "alive\n", f"cycle {i}, {where}: process {self.keeper} is gone"

    def cycle(self) -> None:
        sb, i = self.sb, self.done
        sb.files.write(f"/w/f-{i}", str(i))
        assert sb.commands.run(["sh", "-c", f"echo {i} >> /w/log"]).exit_code == 0
        assert sb.pause().state == "paused"
        assert sb.resume().state == "running"
        self._check(i, "after resume")
        snap = sb.snapshot(f"cycle-{i}")
        sb.files.write("/w/after-snapshot", "undone by the restore")
        assert sb.resume(snapshot=snap.id).state == "running"
        assert not sb.files.exists("/w/after-snapshot"), f"cycle {i}: the restore kept a later change"
        if not self.full:  # a file-system snapshot restarts the sandbox's processes
            self.keeper = self._start_keeper()
        self._check(i, "after restore")
        if self.previous is not None:
            self.store.remove(self.previous)
        self.previous = snap.id
        self.done += 1
