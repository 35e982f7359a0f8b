"""Blocking frame I/O over a socket or a file descriptor (stdlib only).

``FramedChannel`` is the one place where frames meet a transport: the SDK
client, the supervisor and the guest agent all use it. Sends are serialised
by a lock so several threads may send; exactly one thread should receive.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from . import codec
from .codec import Frame, FrameDecoder, ProtocolError

READ_SIZE = 1024 * 1024


class ChannelClosed(Exception):
    """The peer closed the channel (or it broke) before a frame was complete."""


class FramedChannel:
    """Frames over a connected stream socket or a pair of raw file descriptors."""

    def __init__(self, sock: socket.socket | None = None, *, read_fd: int | None = None, write_fd: int | None = None):
        if sock is None and (read_fd is None or write_fd is None):
            raise ValueError("FramedChannel needs a socket or both read_fd and write_fd")
        self._sock = sock
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._decoder = FrameDecoder()
        self._pending: list[Frame] = []
        self._send_lock = threading.Lock()
        self._closed = False

    # -- sending --------------------------------------------------------------

    def send_raw(self, encoded: bytes) -> None:
        """Send an already-encoded frame (from the ``codec`` constructors)."""
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            try:
                if self._sock is not None:
                    self._sock.sendall(encoded)
                else:
                    view = memoryview(encoded)
                    while view:
                        written = os.write(self._write_fd, view)  # type: ignore[arg-type]
                        view = view[written:]
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise ChannelClosed(f"send failed: {exc}") from None

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.send_raw(codec.encode(header, payload))

    # -- receiving ------------------------------------------------------------

    def recv(self) -> Frame:
        """Block until one whole frame arrives. Raises ``ChannelClosed`` at EOF."""
        while not self._pending:
            chunk = self._read_some()
            if not chunk:
                if self._decoder.buffered:
                    raise ChannelClosed("peer closed the channel mid-frame")
                raise ChannelClosed("peer closed the channel")
            self._pending.extend(self._decoder.feed(chunk))
        return self._pending.pop(0)

    def _read_some(self) -> bytes:
        try:
            if self._sock is not None:
                return self._sock.recv(READ_SIZE)
            return os.read(self._read_fd, READ_SIZE)  # type: ignore[arg-type]
        except (ConnectionResetError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise ChannelClosed(f"receive failed: {exc}") from None

    def handshake(self, role: str, **extra: Any) -> dict[str, Any]:
        """Send our hello and check the peer's; returns the peer's hello header."""
        self.send_raw(codec.hello(role, **extra))
        return codec.check_hello(self.recv())

    def close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()


__all__ = ["ChannelClosed", "Frame", "FramedChannel", "ProtocolError"]
