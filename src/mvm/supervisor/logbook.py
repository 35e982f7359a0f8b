"""The sandbox's persisted log (``logs.jsonl``): one JSON ``LogEvent`` per line.

Process output is split into lines per (pid, stream); a partial line is held
until its newline or the process's exit. The file is capped (``MAX_LOG_BYTES``);
past the cap one notice is written and further process output is dropped (the
supervisor's own events still go in). Known secret values are redacted before
anything is written.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MAX_LOG_BYTES = 64 * 1024 * 1024
MAX_LINE = 8192


class LogBook:
    def __init__(self, path: Path, redact: Callable[[str], str] = lambda s: s):
        self.path = path
        self._redact = redact
        self._lock = threading.Condition()
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the sandbox's life
        os.chmod(path, 0o600)
        self._size = path.stat().st_size
        self._partial: dict[tuple[int, str], str] = {}
        self._capped = False
        self._closed = False
        self._lost = 0  # lines that could not be written (disk full), reported once it can again

    def write(
        self, source: str, stream: str, message: str, audit_id: str | None = None, *, force: bool = False
    ) -> None:
        entry: dict[str, Any] = {
            "timestamp": time.time(),
            "source": source,
            "stream": stream,
            "message": self._redact(message),
        }
        if audit_id:
            entry["audit_id"] = audit_id
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            if self._closed:
                return
            if self._size + len(line) > MAX_LOG_BYTES and not force:
                if not self._capped:
                    self._capped = True
                    notice = json.dumps(
                        {
                            "timestamp": time.time(),
                            "source": "supervisor",
                            "stream": "system",
                            "message": f"log limit of {MAX_LOG_BYTES} bytes reached; process output no longer logged",
                        }
                    )
                    self._fh.write(notice + "\n")
                    self._fh.flush()
                    self._lock.notify_all()
                return
            if self._lost:
                notice = json.dumps({"timestamp": time.time(), "source": "supervisor", "stream": "system",
                                     "message": f"{self._lost} log lines were dropped: the log could not be "
                                                "written"}) + "\n"
                line = notice + line
            try:
                self._fh.write(line)
                self._fh.flush()
            except (OSError, ValueError) as exc:  # MVM_HOME full (ENOSPC): the sandbox goes on, its log loses lines
                self._lost += 1
                if self._lost == 1:
                    print(f"mvm supervisor: cannot write the sandbox log ({exc}); lines are dropped until it can",
                          file=sys.stderr, flush=True)
                self._drop_buffer()
                return
            self._lost = 0
            self._size += len(line)
            self._lock.notify_all()

    def _drop_buffer(self) -> None:
        """After a failed write: forget what the file object still buffers (a later flush
        must not write half a line)."""
        try:
            self._fh.close()
        except OSError:
            pass
        try:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the sandbox's life
        except OSError:
            pass  # still closed: the next write fails the same way and is counted

    def system(self, message: str, audit_id: str | None = None) -> None:
        self.write("supervisor", "system", message, audit_id, force=True)

    def process_output(self, pid: int, stream: str, data: bytes) -> None:
        key = (pid, stream)
        text = self._partial.pop(key, "") + data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self._partial[key] = lines.pop()
        if len(self._partial[key]) > MAX_LINE:
            lines.append(self._partial.pop(key))
        for line in lines:
            for start in range(0, max(len(line), 1), MAX_LINE):
                self.write(f"process:{pid}", stream, line[start : start + MAX_LINE])

    def process_exit(self, pid: int) -> None:
        for stream in ("stdout", "stderr"):
            rest = self._partial.pop((pid, stream), "")
            if rest:
                self.write(f"process:{pid}", stream, rest)

    def read(self, *, tail: int | None = None, since: float | None = None) -> list[dict[str, Any]]:
        entries = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if since is not None and entry.get("timestamp", 0) < since:
                    continue
                entries.append(entry)
        return entries[-tail:] if tail else entries

    def follow(self, offset: int, stop: Callable[[], bool]) -> Iterator[dict[str, Any]]:
        """Yield entries appended after byte ``offset`` until ``stop()`` is true (checked
        at least every half second)."""
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(offset)
            pending = ""
            while not stop():
                chunk = fh.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith("\n"):
                        try:
                            yield json.loads(pending)
                        except ValueError:
                            pass
                        pending = ""
                    continue
                with self._lock:
                    if self._closed:
                        return
                    self._lock.wait(timeout=0.5)

    def size(self) -> int:
        with self._lock:
            return self._size

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._fh.close()
            self._lock.notify_all()
