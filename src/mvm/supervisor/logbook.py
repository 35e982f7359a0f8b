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
        self._append([_entry(time.time(), source, stream, self._redact(message), audit_id)], force=force)

    def _append(self, lines: list[str], *, force: bool = False) -> None:
        """Write whole lines at once (one write, one flush), up to the cap unless ``force``."""
        with self._lock:
            if self._closed:
                return
            if not force:
                room = MAX_LOG_BYTES - self._size
                kept = 0
                for line in lines:
                    room -= len(line)
                    if room < 0:
                        break
                    kept += 1
                if kept < len(lines):
                    lines = lines[:kept]
                    if not self._capped:
                        self._capped = True
                        lines.append(_entry(time.time(), "supervisor", "system",
                                            f"log limit of {MAX_LOG_BYTES} bytes reached; process output no "
                                            "longer logged"))
                if not lines:
                    return
            if self._lost:
                lines.insert(0, _entry(time.time(), "supervisor", "system",
                                       f"{self._lost} log lines were dropped: the log could not be written"))
            text = "".join(lines)
            try:
                self._fh.write(text)
                self._fh.flush()
            except (OSError, ValueError) as exc:  # MVM_HOME full (ENOSPC): the sandbox goes on, its log loses lines
                self._lost += len(lines)
                if self._lost == len(lines):
                    print(f"mvm supervisor: cannot write the sandbox log ({exc}); lines are dropped until it can",
                          file=sys.stderr, flush=True)
                self._drop_buffer()
                return
            self._lost = 0
            self._size += len(text)
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
        """Log a chunk of output line by line: redacted once per chunk, written at once.
        Past the cap nothing is done at all, so a flood costs the log nothing more."""
        if self._capped:
            return
        key = (pid, stream)
        text = self._partial.pop(key, "") + data.decode("utf-8", errors="replace")
        end = text.rfind("\n")
        rest = text[end + 1 :]
        lines = self._redact(text[:end]).split("\n") if end >= 0 else []
        if len(rest) > MAX_LINE:
            lines.append(self._redact(rest))
        else:
            self._partial[key] = rest
        self._log_lines(f"process:{pid}", stream, lines)

    def process_exit(self, pid: int) -> None:
        for stream in ("stdout", "stderr"):
            rest = self._partial.pop((pid, stream), "")
            if rest and not self._capped:
                self._log_lines(f"process:{pid}", stream, [self._redact(rest)])

    def _log_lines(self, source: str, stream: str, lines: list[str]) -> None:
        if not lines:
            return
        head = _entry_head(time.time(), source, stream)
        room = MAX_LOG_BYTES - self._size  # stop building entries the cap would drop anyway
        entries = []
        for line in lines:
            for start in range(0, max(len(line), 1), MAX_LINE):
                entry = head + _quote(line[start : start + MAX_LINE]) + "}\n"
                entries.append(entry)
                room -= len(entry)
                if room < 0:
                    self._append(entries)
                    return
        self._append(entries)

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


#: A JSON string literal of a str, non-ASCII kept (what ``json.dumps(s, ensure_ascii=False)`` gives).
_quote: Callable[[str], str] = json.encoder.encode_basestring


def _entry_head(timestamp: float, source: str, stream: str) -> str:
    return f'{{"timestamp": {timestamp!r}, "source": {_quote(source)}, "stream": {_quote(stream)}, "message": '


def _entry(timestamp: float, source: str, stream: str, message: str, audit_id: str | None = None) -> str:
    """One ``LogEvent`` line, the same as ``json.dumps(entry, ensure_ascii=False)`` (built
    by hand: a flood of short lines makes this the log's hot path)."""
    line = _entry_head(timestamp, source, stream) + _quote(message)
    if audit_id:
        line += f', "audit_id": {_quote(audit_id)}'
    return line + "}\n"
