"""What the supervisor knows of each guest process: bounded output replay, subscribers, exit.

The agent reports output and exit as events (docs/protocol.md); each event is
applied to the process's record here and fanned out to subscribers
(``exec.run``, ``proc.attach``). Records are created on first sight, so output
that arrives before the ``proc.start`` answer is not lost.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Output kept per process for late ``proc.attach`` replays; older bytes are dropped.
REPLAY_BYTES = 4 * 1024 * 1024
#: Exited processes remembered for ``proc.wait``/``proc.list``.
MAX_EXITED = 1000
#: Trimmed in batches of this many, so a process start does not scan the table each time.
_TRIM_BATCH = 100

Subscriber = Callable[[str, bytes], None]


@dataclass
class ProcessRecord:
    pid: int
    argv: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    audit_id: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    ended_at: float | None = None
    replay: deque[tuple[str, bytes]] = field(default_factory=deque)
    replay_size: int = 0
    dropped_bytes: int = 0
    subscribers: list[Subscriber] = field(default_factory=list)
    exited: threading.Event = field(default_factory=threading.Event)
    #: Set once it exits, besides ``exited`` (a request's wake event: ``ProcessTable.wake_on_exit``).
    exit_watchers: list[threading.Event] = field(default_factory=list)
    #: Why its end is unknown (the guest agent was lost while it ran), else None.
    lost: str | None = None

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "argv": self.argv,
            "running": not self.exited.is_set(),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "started_at": self.started_at,
            "audit_id": self.audit_id,
        }


class ProcessTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[int, ProcessRecord] = {}

    def get(self, pid: int, *, create: bool = False) -> ProcessRecord | None:
        with self._lock:
            record = self._records.get(pid)
            if record is None and create:
                record = self._records[pid] = ProcessRecord(pid)
                if len(self._records) > MAX_EXITED + _TRIM_BATCH:
                    self._trim()
            return record

    def started(self, pid: int, argv: list[str], audit_id: str | None) -> ProcessRecord:
        record = self.get(pid, create=True)
        assert record is not None
        record.argv = argv
        record.audit_id = audit_id
        return record

    def output(self, pid: int, stream: str, data: bytes) -> None:
        record = self.get(pid, create=True)
        assert record is not None
        with self._lock:
            record.replay.append((stream, data))
            record.replay_size += len(data)
            while record.replay_size > REPLAY_BYTES and record.replay:
                _, old = record.replay.popleft()
                record.replay_size -= len(old)
                record.dropped_bytes += len(old)
            subscribers = list(record.subscribers)
        for deliver in subscribers:
            deliver(stream, data)

    def exit(self, pid: int, exit_code: int, signal: int | None, ended_at: float | None) -> ProcessRecord:
        record = self.get(pid, create=True)
        assert record is not None
        with self._lock:
            record.exit_code = exit_code
            record.signal = signal
            record.ended_at = ended_at or time.time()
        record.exited.set()
        with self._lock:  # after exited is set: a watcher added from now on sees it exited
            watchers, record.exit_watchers = record.exit_watchers, []
        for watcher in watchers:
            watcher.set()
        return record

    def wake_on_exit(self, record: ProcessRecord, watcher: threading.Event) -> None:
        """Set ``watcher`` when the process exits (at once if it has)."""
        with self._lock:
            record.exit_watchers.append(watcher)
        if record.exited.is_set():
            watcher.set()

    def stop_waking(self, record: ProcessRecord, watcher: threading.Event) -> None:
        with self._lock:
            if watcher in record.exit_watchers:
                record.exit_watchers.remove(watcher)

    def subscribe(self, pid: int, deliver: Subscriber, *, replay: bool) -> ProcessRecord:
        """Attach ``deliver``; with ``replay`` it first gets the kept output, in order,
        with nothing lost or doubled between replay and live delivery."""
        record = self.get(pid, create=True)
        assert record is not None
        with self._lock:
            backlog = list(record.replay) if replay else []
            record.subscribers.append(deliver)
            # Deliver the backlog under the lock so live output can't interleave.
            for stream, data in backlog:
                deliver(stream, data)
        return record

    def unsubscribe(self, pid: int, deliver: Subscriber) -> None:
        with self._lock:
            record = self._records.get(pid)
            if record and deliver in record.subscribers:
                record.subscribers.remove(deliver)

    def all(self) -> list[ProcessRecord]:
        with self._lock:
            return list(self._records.values())

    def mark_all_lost(self, reason: str | None = None) -> None:
        """The guest went away (stop/destroy): every running process is gone. With a
        ``reason`` (the agent was lost, not told to stop) their outcome is unknown, and
        the calls waiting for them say so instead of reporting an exit."""
        for record in self.all():
            if not record.exited.is_set():
                record.lost = reason
                self.exit(record.pid, -1, None, time.time())

    def new_boot(self) -> None:
        """A new guest (start after stop, snapshot restore) reuses pid numbers: forget the
        previous boot's records so none of its output or exit status leaks into a new pid."""
        self.mark_all_lost()
        with self._lock:
            self._records.clear()

    def _trim(self) -> None:
        exited = [r for r in self._records.values() if r.exited.is_set() and not r.subscribers]
        for record in sorted(exited, key=lambda r: r.ended_at or 0)[: max(0, len(exited) - MAX_EXITED)]:
            self._records.pop(record.pid, None)
