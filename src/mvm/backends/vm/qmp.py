"""A small synchronous QMP client over QEMU's Unix socket.

QMP is line-delimited JSON: a greeting, ``qmp_capabilities``, then one
``{"execute": ...}`` at a time answered by ``{"return": ...}`` or
``{"error": {...}}``; asynchronous ``{"event": ...}`` lines may arrive at any
moment and are kept in ``events`` (bounded) rather than mistaken for answers.
"""

from __future__ import annotations

import collections
import json
import socket
import time
from pathlib import Path
from typing import Any

from ...errors import SandboxError

MAX_LINE = 16 * 1024 * 1024  # query-* answers are small; a line beyond this is a broken peer


class QmpError(SandboxError):
    """QEMU answered a command with an error (``details['qmp_class']`` names it)."""


class QmpClient:
    def __init__(self, path: Path, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self.greeting: dict[str, Any] = {}

    # -- connection -------------------------------------------------------------

    def connect(self, deadline: float, alive: Any = None) -> None:
        """Connect (retrying until QEMU created the socket, or ``deadline``), negotiate capabilities.

        ``alive()`` returning False (QEMU exited) stops the retries early.
        """
        last: Exception | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                self._sock = sock
                break
            except OSError as exc:
                sock.close()
                last = exc
            if time.monotonic() > deadline or (alive is not None and not alive()):
                raise SandboxError(f"vm: cannot connect to QMP at {self.path}: {last}")
            time.sleep(0.005)
        self.greeting = self._read_message()
        self.execute("qmp_capabilities")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------

    def execute(self, command: str, **arguments: Any) -> Any:
        if self._sock is None:
            raise SandboxError("vm: QMP is not connected")
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise SandboxError(f"vm: QMP {command} failed: {exc}") from None
        while True:
            reply = self._read_message()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(
                    f"vm: QMP {command} failed: {err.get('desc', err)}",
                    qmp_class=str(err.get("class", "")),
                )
            if "return" in reply:
                return reply["return"]

    def status(self) -> str:
        """The run state (``running``, ``paused``, ``inmigrate``, ``postmigrate``, ...)."""
        return str(self.execute("query-status")["status"])

    def _read_message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise SandboxError(f"vm: QMP did not answer within {self.timeout:.0f} s") from None
            except OSError as exc:
                raise SandboxError(f"vm: QMP connection failed: {exc}") from None
            if not chunk:
                raise SandboxError("vm: QEMU closed the QMP connection (it exited)")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise SandboxError("vm: QMP line too long")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise SandboxError(f"vm: QMP sent invalid JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise SandboxError("vm: QMP sent a non-object")
        return message
