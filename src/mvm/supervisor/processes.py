"""What the supervisor knows of each guest process: bounded output replay, subscribers, exit.

The agent reports output and exit as events (docs/protocol.md); each event is
applied to the process's record here and fanned out to subscribers
(``exec.run``, ``proc.attach``). Records are created on first sight, so output
that arrives before the ``proc.start`` answer is not lost.

Flow control (docs/protocol.md, "Flow control"): a subscriber is an ``Outbox`` --
output is put in it without ever blocking the agent's reader, and its request's
thread sends it on at the client's pace. The agent gets credit back for a process's
output (``proc.window``) only as far as its slowest subscriber has sent it, so a
stalled reader holds at most one window per subscriber here; the agent stops
reading that process's pipes meanwhile (the process blocks), everything else flows.

A process is named by its pid *and* the agent generation that ran it (the supervisor's
agent connection it was started on: ``AgentLink.generation``). A restarted agent's
processes may get the pids of the dead agent's processes; with the generation in the key
a new process's output or exit is never applied to an old record, and an old handle
never reaches a new process (docs/reliability.md, "Agent restart").
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import errors
from ..protocol import codec
from ..protocol.codec import GRANT_STEP

#: Output kept per process for late ``proc.attach`` replays; older bytes are dropped.
REPLAY_BYTES = 4 * 1024 * 1024
#: Exited processes remembered for ``proc.wait``/``proc.list``.
MAX_EXITED = 1000
#: Trimmed in batches of this many, so a process start does not scan the table each time.
_TRIM_BATCH = 100

#: ``on_window(generation, pid, size)``: send the agent that started ``pid`` a ``proc.window``
#: (never called under the table's lock).
OnWindow = Callable[[int, int, int], None]


class Outbox:
    """A subscriber's output not sent on yet: filled without blocking (the agent's reader),
    emptied by its request's thread; ``wake`` is set whenever something is put in."""

    def __init__(self, wake: threading.Event):
        self.wake = wake
        self._items: deque[tuple[str, bytes]] = deque()
        self.queued = 0  # bytes put in and not yet taken out and sent

    def put(self, stream: str, data: bytes) -> None:
        self._items.append((stream, data))
        self.queued += len(data)
        self.wake.set()

    def take(self) -> tuple[str, bytes] | None:
        """The oldest item (``done`` it once sent), or None."""
        try:
            return self._items.popleft()
        except IndexError:
            return None


class OutputWindows:
    """Sends the agent its ``proc.window`` grants from a thread of its own, coalesced per pid:
    grants are made on the agent reader's thread, which must never block on a send to the
    agent (an agent that stops reading while its answers wait to be read would hang both)."""

    def __init__(self, send: Callable[[codec.Encoded], None], generation: Callable[[], int]):
        self._send = send
        self._generation = generation  # the current agent's
        self._cond = threading.Condition()
        self._pending: dict[tuple[int, int], int] = {}
        self._thread: threading.Thread | None = None

    def grant(self, generation: int, pid: int, size: int) -> None:
        with self._cond:
            key = (generation, pid)
            self._pending[key] = self._pending.get(key, 0) + size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mvm-output-windows", daemon=True)
                self._thread.start()
            self._cond.notify()

    def reset(self) -> None:
        """The agent connection changed: grants for the old one are void."""
        with self._cond:
            self._pending.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                grants, self._pending = self._pending, {}
            for (generation, pid), size in grants.items():
                if generation != self._generation():
                    continue  # for a process of an agent since replaced: its pid may be another's now
                try:
                    self._send(codec.event("proc.window", pid=pid, bytes=min(size, codec.MAX_GRANT)))
                except errors.MvmError:
                    pass  # no agent connection: a new one starts every credit afresh


@dataclass
class ProcessRecord:
    pid: int
    #: The agent connection that started it (``AgentLink.generation``).
    generation: int = 0
    argv: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    audit_id: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    ended_at: float | None = None
    replay: deque[tuple[str, bytes]] = field(default_factory=deque)
    replay_size: int = 0
    dropped_bytes: int = 0
    subscribers: list[Outbox] = field(default_factory=list)
    #: Output bytes the agent sent that were not granted back to it yet (``proc.window``).
    ungranted: int = 0
    exited: threading.Event = field(default_factory=threading.Event)
    #: Set once it exits, besides ``exited`` (a request's wake event: ``ProcessTable.wake_on_exit``).
    exit_watchers: list[threading.Event] = field(default_factory=list)
    #: Why its end is unknown (the guest agent was lost while it ran), else None.
    lost: str | None = None

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "agent_generation": self.generation,
            "argv": self.argv,
            "running": not self.exited.is_set(),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "started_at": self.started_at,
            "audit_id": self.audit_id,
        }


Key = tuple[int, int]  # (agent generation, pid)


class ProcessTable:
    def __init__(self, on_window: OnWindow | None = None) -> None:
        self._lock = threading.Lock()
        self._records: dict[Key, ProcessRecord] = {}
        self.on_window = on_window
        #: Agent generations below this one are gone: their late events create no record.
        self._gone_below = 0

    def get(self, generation: int, pid: int, *, create: bool = False) -> ProcessRecord | None:
        with self._lock:
            record = self._records.get((generation, pid))
            if record is None and create and generation >= self._gone_below:
                record = self._records[(generation, pid)] = ProcessRecord(pid, generation)
                if len(self._records) > MAX_EXITED + _TRIM_BATCH:
                    self._trim()
            return record

    def starting(self, generation: int, pid: int) -> None:
        """The agent answered a ``proc.start`` with ``pid`` (called before any event of the
        new process is applied): an earlier process's record under the same key (a pid the
        agent's kernel gave out again) is replaced by the new process's."""
        with self._lock:
            if generation >= self._gone_below:
                self._records[(generation, pid)] = ProcessRecord(pid, generation)

    def started(self, generation: int, pid: int, argv: list[str], audit_id: str | None) -> ProcessRecord:
        record = self.get(generation, pid, create=True)
        if record is None:  # its agent died right after it answered: the process went with it
            record = ProcessRecord(pid, generation, lost="its guest agent died as it started")
            record.exited.set()
        record.argv = argv
        record.audit_id = audit_id
        return record

    def output(self, generation: int, pid: int, stream: str, data: bytes) -> None:
        """Keep it for replays, put it in every subscriber's outbox (never blocks)."""
        record = self.get(generation, pid, create=True)
        if record is None:
            return  # a late event of a dead agent's process nobody knew of
        with self._lock:
            record.replay.append((stream, data))
            record.replay_size += len(data)
            while record.replay_size > REPLAY_BYTES and record.replay:
                _, old = record.replay.popleft()
                record.replay_size -= len(old)
                record.dropped_bytes += len(old)
            for outbox in record.subscribers:
                outbox.put(stream, data)
            record.ungranted += len(data)
            grant = self._grantable(record)
        self._grant(record, grant)

    def sent(self, record: ProcessRecord, outbox: Outbox, size: int) -> None:
        """A subscriber's request thread sent (or dropped) ``size`` bytes it took from ``outbox``."""
        with self._lock:
            outbox.queued -= size
            grant = self._grantable(record)
        self._grant(record, grant)

    def _grantable(self, record: ProcessRecord) -> int:
        """What the agent may be granted back now (lock held): the bytes it sent, less what
        the slowest subscriber still holds; in steps of ``GRANT_STEP``."""
        backlog = max((outbox.queued for outbox in record.subscribers), default=0)
        free = record.ungranted - backlog
        if free < GRANT_STEP:  # (an agent out of credit has STREAM_WINDOW ungranted: a full step once drained)
            return 0
        record.ungranted -= free
        return free

    def _grant(self, record: ProcessRecord, size: int) -> None:
        if size > 0 and self.on_window is not None:
            self.on_window(record.generation, record.pid, size)

    def reset_windows(self) -> None:
        """A new agent connection: the agent starts each process's credit afresh."""
        with self._lock:
            for record in self._records.values():
                record.ungranted = 0

    def exit(self, generation: int, pid: int, exit_code: int, signal: int | None, ended_at: float | None) -> None:
        record = self.get(generation, pid, create=True)
        if record is not None:
            self._ended(record, exit_code, signal, ended_at)

    def _ended(self, record: ProcessRecord, exit_code: int, signal: int | None, ended_at: float | None) -> None:
        with self._lock:
            record.exit_code = exit_code
            record.signal = signal
            record.ended_at = ended_at or time.time()
        record.exited.set()
        with self._lock:  # after exited is set: a watcher added from now on sees it exited
            watchers, record.exit_watchers = record.exit_watchers, []
        for watcher in watchers:
            watcher.set()

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

    def subscribe(self, record: ProcessRecord, outbox: Outbox, *, replay: bool) -> None:
        """Attach ``outbox``; with ``replay`` it first gets the kept output, in order,
        with nothing lost or doubled between replay and live delivery."""
        with self._lock:
            # The backlog goes in under the lock so live output can't interleave.
            for stream, data in (record.replay if replay else ()):
                outbox.put(stream, data)
            record.subscribers.append(outbox)

    def unsubscribe(self, record: ProcessRecord, outbox: Outbox) -> None:
        with self._lock:
            if outbox not in record.subscribers:
                return
            record.subscribers.remove(outbox)
            grant = self._grantable(record)  # a stalled reader that leaves no longer holds the process
        self._grant(record, grant)

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
                self._ended(record, -1, None, time.time())

    def agent_gone(self, next_generation: int, reason: str) -> None:
        """The agents before ``next_generation`` are gone (an agent restart): their
        processes ended with them. Their records stay for the handles that ask
        (``proc.wait`` says the outcome is unknown); the new agent's start afresh."""
        with self._lock:
            self._gone_below = next_generation
        self.mark_all_lost(reason)

    def new_boot(self, next_generation: int) -> None:
        """A new guest (start after stop, snapshot restore) reuses pid numbers: forget the
        previous boot's records so none of its output or exit status leaks into a new pid."""
        with self._lock:
            self._gone_below = next_generation
        self.mark_all_lost()
        with self._lock:
            self._records.clear()

    def _trim(self) -> None:
        exited = [r for r in self._records.values() if r.exited.is_set() and not r.subscribers]
        for record in sorted(exited, key=lambda r: r.ended_at or 0)[: max(0, len(exited) - MAX_EXITED)]:
            self._records.pop((record.generation, record.pid), None)
