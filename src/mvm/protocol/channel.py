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
from .codec import Encoded, Frame, FrameDecoder, ProtocolError

#: Bytes asked for per read while looking for frame headers: small, because a big payload
#: after a header is read separately, straight into its own buffer (``FrameDecoder``).
READ_SIZE = 64 * 1024


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

    def send_raw(self, encoded: Encoded) -> None:
        """Send an already-encoded frame (from the ``codec`` constructors; a (head, payload)
        pair from ``encode_parts`` goes out in one gathering write, without joining it)."""
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            try:
                if isinstance(encoded, bytes):
                    if self._sock is not None:
                        self._sock.sendall(encoded)
                    else:
                        _write_all(self._write_fd, [memoryview(encoded)])  # type: ignore[arg-type]
                elif self._sock is not None:
                    _sendmsg_all(self._sock, [memoryview(part) for part in encoded])
                else:
                    _write_all(self._write_fd, [memoryview(part) for part in encoded])  # type: ignore[arg-type]
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise ChannelClosed(f"send failed: {exc}") from None

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.send_raw(codec.encode(header, payload))

    # -- receiving ------------------------------------------------------------

    def recv(self) -> Frame:
        """Block until one whole frame arrives. Raises ``ChannelClosed`` at EOF."""
        while not self._pending:
            direct = self._decoder.direct_payload()
            if direct is not None:  # the rest of a big stream payload: straight into its buffer
                count = self._read_into(direct)
                if not count:
                    raise ChannelClosed("peer closed the channel mid-frame")
                self._pending.extend(self._decoder.filled(count))
                continue
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

    def _read_into(self, view: memoryview) -> int:
        try:
            if self._sock is not None:
                return self._sock.recv_into(view)
            return os.readv(self._read_fd, [view])  # type: ignore[arg-type]
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


def _sendmsg_all(sock: socket.socket, views: list[memoryview]) -> None:
    while views:
        _advance(views, sock.sendmsg(views))


def _write_all(fd: int, views: list[memoryview]) -> None:
    while views:
        _advance(views, os.writev(fd, views))


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of ``views`` (in place)."""
    while views and sent >= len(views[0]):
        sent -= len(views.pop(0))
    if sent:
        views[0] = views[0][sent:]


__all__ = ["ChannelClosed", "Frame", "FramedChannel", "ProtocolError"]
