"""Blocking frame I/O over a socket or a file descriptor (stdlib only).

``FramedChannel`` is the one place where frames meet a transport: the SDK
client, the supervisor and the guest agent all use it. Sends are serialised
by a lock so several threads may send; exactly one thread should receive.

Over an AF_UNIX socket a frame may carry file descriptors (SCM_RIGHTS; the
header says how many in ``fds``, at most ``codec.MAX_FDS``). The kernel delivers
them with the first byte of the frame's ``sendmsg``, so a receiving channel
(``receive_fds=True``) queues them as they arrive and hands them to the frame that
announced them, in order. A descriptor no frame being read can own, more than
one frame's worth at once, or a frame announcing one that did not arrive is a
protocol error;
a channel that does not receive descriptors reads with ``recv``, which makes the
kernel close any that were sent.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from . import codec
from .codec import MAX_FDS, Encoded, Frame, FrameDecoder, ProtocolError

_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

#: Bytes asked for per read while looking for frame headers: small, because a big payload
#: after a header is read separately, straight into its own buffer (``FrameDecoder``).
READ_SIZE = 64 * 1024


class ChannelClosed(Exception):
    """The peer closed the channel (or it broke) before a frame was complete."""


class FramedChannel:
    """Frames over a connected stream socket or a pair of raw file descriptors."""

    def __init__(self, sock: socket.socket | None = None, *, read_fd: int | None = None, write_fd: int | None = None,
                 receive_fds: bool = False):
        if sock is None and (read_fd is None or write_fd is None):
            raise ValueError("FramedChannel needs a socket or both read_fd and write_fd")
        self._sock = sock
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._decoder = FrameDecoder()
        self._pending: list[Frame] = []
        self._send_lock = threading.Lock()
        self._closed = False
        #: Descriptors received, not yet claimed by the frame that announced them.
        self._fds: collections.deque[int] = collections.deque()
        self._receive_fds = receive_fds and self.passes_fds

    @property
    def passes_fds(self) -> bool:
        """Can frames on this channel carry file descriptors (an AF_UNIX socket)?"""
        return self._sock is not None and self._sock.family == socket.AF_UNIX

    # -- sending --------------------------------------------------------------

    def send_raw(self, encoded: Encoded, fds: Sequence[int] = ()) -> None:
        """Send an already-encoded frame (from the ``codec`` constructors; a (head, payload)
        pair from ``encode_parts`` goes out in one gathering write, without joining it).
        ``fds`` go with it (its header must say ``fds``: their number); they stay open here."""
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            try:
                if fds:
                    if not self.passes_fds or len(fds) > MAX_FDS:
                        raise ValueError(f"this channel cannot pass {len(fds)} descriptor(s)")
                    views = [memoryview(encoded)] if isinstance(encoded, bytes) else [memoryview(p) for p in encoded]
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    assert self._sock is not None
                    _advance(views, self._sock.sendmsg(views, rights))  # the descriptors ride on the first byte
                    _sendmsg_all(self._sock, views)
                elif isinstance(encoded, bytes):
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
                self._take(self._decoder.filled(count))
                continue
            chunk = self._read_some()
            if not chunk:
                if self._decoder.buffered:
                    raise ChannelClosed("peer closed the channel mid-frame")
                raise ChannelClosed("peer closed the channel")
            self._take(self._decoder.feed(chunk))
        return self._pending.pop(0)

    def _take(self, frames: list[Frame]) -> None:
        """Queue decoded frames, each with the descriptors its header announced."""
        for frame in frames:
            wanted = frame.header.get("fds")
            if wanted:
                if len(self._fds) < wanted:
                    raise ProtocolError(f"a {frame.kind} frame announced {wanted} descriptor(s) that did not arrive")
                frame = dataclasses.replace(frame, fds=tuple(self._fds.popleft() for _ in range(wanted)))
            self._pending.append(frame)
        if self._fds and (len(self._fds) > MAX_FDS or not self._decoder.buffered):
            # (a descriptor arrives with its frame's first byte: only a frame still being read may own one)
            raise ProtocolError(f"{len(self._fds)} descriptor(s) arrived that no frame announced")

    def _received(self, ancillary: list[tuple[int, int, bytes]], flags: int) -> None:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:  # more than a frame may carry (the kernel closed the rest)
            raise ProtocolError(f"more than {MAX_FDS} descriptor(s) sent at once")

    def _read_some(self) -> bytes:
        try:
            if self._receive_fds:
                assert self._sock is not None
                data, ancillary, flags, _ = self._sock.recvmsg(READ_SIZE, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
                self._received(ancillary, flags)
                return data
            if self._sock is not None:
                return self._sock.recv(READ_SIZE)
            return os.read(self._read_fd, READ_SIZE)  # type: ignore[arg-type]
        except (ConnectionResetError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise ChannelClosed(f"receive failed: {exc}") from None

    def _read_into(self, view: memoryview) -> int:
        try:
            if self._receive_fds:
                assert self._sock is not None
                count, ancillary, flags, _ = self._sock.recvmsg_into([view], _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
                self._received(ancillary, flags)
                return count
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
        if not self._send_lock.acquire(blocking=False):
            # A sender holds the lock, maybe blocked on a full socket whose peer stopped
            # reading (an agent that died while the keeper keeps its socket): a shutdown
            # wakes it (EPIPE), else this close would wait on it for ever.
            self._shutdown()
            self._send_lock.acquire()
        try:
            if self._closed:
                return
            self._closed = True
        finally:
            self._send_lock.release()
        while self._fds:  # received, never claimed
            _close_quietly(self._fds.popleft())
        for frame in self._pending:  # decoded, never taken
            discard_fds(frame)
        if self._sock is not None:
            self._shutdown()
            self._sock.close()

    def _shutdown(self) -> None:
        """Shut the socket down both ways (waking any thread blocked on it); quietly."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def discard_fds(frame: Frame) -> None:
    """Close the descriptors a frame brought (its taker did not want them)."""
    for fd in frame.fds:
        _close_quietly(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


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


__all__ = ["ChannelClosed", "Frame", "FramedChannel", "ProtocolError", "discard_fds"]
