"""Client side of the supervisor's control socket (used by the SDK and mvmctl).

One connection, one reader thread; each request gets its own queue so several
threads (a ``commands.run``, a ``Process.stdout`` iterator, a ``logs(follow=True)``)
can share a sandbox handle without blocking each other.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import errors
from ..protocol import codec
from ..protocol.channel import ChannelClosed, FramedChannel
from ..protocol.codec import Frame, ProtocolError

DataCallback = Callable[[str, bytes], None]
_CLOSED = object()


class SupervisorClient:
    """A connection to one sandbox's supervisor."""

    def __init__(self, socket_path: Path, *, connect_timeout: float = 5.0):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise errors.SandboxNotFound(f"sandbox supervisor is not running ({exc})") from None
        self._channel = FramedChannel(sock)
        try:  # still under connect_timeout: a supervisor that accepts but never answers must not hang us
            self.peer = self._channel.handshake("client")
        except (ChannelClosed, ProtocolError, OSError) as exc:
            self._channel.close()
            raise errors.ProtocolFailure(f"supervisor handshake failed: {exc}") from None
        sock.settimeout(None)
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue[Any]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="mvm-client-reader", daemon=True)
        self._reader.start()

    # -- public ---------------------------------------------------------------

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        on_data: DataCallback | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request; deliver its ``data`` frames to ``on_data``; return the
        final result and payload, or raise the mapped ``MvmError``."""
        ident, box = self._open(op, args, payload)
        try:
            while True:
                try:
                    item = box.get(timeout=timeout)
                except queue.Empty:
                    self._cancel(ident)
                    raise errors.SandboxError(f"{op}: no answer from the sandbox within {timeout} s") from None
                if item is _CLOSED:
                    raise errors.SandboxError(f"{op}: the sandbox closed the connection (it may have been destroyed)")
                frame: Frame = item
                if frame.kind == "data":
                    if on_data is not None:
                        on_data(frame.header["stream"], frame.payload)
                    continue
                return unwrap_response(frame)
        finally:
            with self._lock:
                self._waiting.pop(ident, None)

    def stream(self, op: str, args: dict[str, Any] | None = None) -> Iterator[tuple[str, bytes]]:
        """Yield ``(stream, bytes)`` of ``data`` frames until the response; closing the
        iterator early cancels the request."""
        ident, box = self._open(op, args, b"")
        finished = False
        try:
            while True:
                item = box.get()
                if item is _CLOSED:
                    finished = True
                    return
                if item.kind == "data":
                    yield item.header["stream"], item.payload
                    continue
                finished = True
                unwrap_response(item)
                return
        finally:
            if not finished:
                self._cancel(ident)
            with self._lock:
                self._waiting.pop(ident, None)

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    # -- internals ------------------------------------------------------------

    def _open(self, op: str, args: dict[str, Any] | None, payload: bytes) -> tuple[int, queue.Queue[Any]]:
        if self._closed:
            raise errors.SandboxError("this sandbox handle is closed")
        ident = next(self._ids)
        box: queue.Queue[Any] = queue.Queue()
        with self._lock:
            self._waiting[ident] = box
        try:
            self._channel.send_raw(codec.request(ident, op, args, payload))
        except ChannelClosed:
            with self._lock:
                self._waiting.pop(ident, None)
            raise errors.SandboxError(f"{op}: the sandbox is gone (its supervisor closed the connection)") from None
        return ident, box

    def _cancel(self, ident: int) -> None:
        try:
            self._channel.send_raw(codec.cancel(ident))
        except ChannelClosed:
            pass

    def _read_loop(self) -> None:
        try:
            while True:
                frame = self._channel.recv()
                ident = frame.id
                with self._lock:
                    box = self._waiting.get(ident) if ident is not None else None
                if box is not None:
                    box.put(frame)
        except (ChannelClosed, ProtocolError, OSError):
            pass
        finally:
            with self._lock:
                boxes = list(self._waiting.values())
            for box in boxes:
                box.put(_CLOSED)


def unwrap_response(frame: Frame) -> tuple[dict[str, Any], bytes]:
    """A response frame's ``(result, payload)``, or its error raised as the mapped ``MvmError``."""
    if frame.header.get("ok"):
        return dict(frame.header.get("result") or {}), frame.payload
    raise errors.from_wire(frame.header.get("error") or {})
