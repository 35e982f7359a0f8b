"""TCP connections relayed over one framed channel, with per-stream credit windows.

Both ends of the supervisor<->agent channel run a ``StreamMux`` (stdlib only: this
module is shipped into guests with the codec). A *stream* pairs a local socket
with a stream id; its bytes travel as ``data`` frames on stream ``"tcp"``
(``id`` = stream id, ``eof: true`` = no more bytes this way), and three events
steer it (docs/protocol.md): ``tcp.open`` (the guest accepted a connection the
host should serve), ``tcp.window`` (the receiver grants more bytes) and
``tcp.close`` (abort: the stream is gone, the local socket is reset).

Flow control: each direction starts with ``TCP_WINDOW`` bytes of credit; the
receiver grants more as it writes bytes into its local socket. A sender stops
reading its socket when its credit is spent, so a slow reader never makes the
other side buffer more than one window, and never blocks the channel, other
streams, or command traffic. A peer that sends past its credit, or after its EOF,
gets the stream reset (never the channel).

Threads: one pump thread owns the sockets (a selector; non-blocking I/O) and
sends every frame of an attached stream; the channel's reader calls ``feed``,
which only updates state under the lock and wakes the pump (it never blocks on
a socket or on the channel). A *pending* stream (``pending``) has no socket yet:
a handler thread reads and writes it directly (the egress proxy reading a
request head), then ``attach``es a socket and leaves the rest to the pump.
"""

from __future__ import annotations

import itertools
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import codec
from .codec import CHUNK_SIZE, TCP_STREAM, TCP_WINDOW, Frame

#: ``send(encoded)`` puts one frame on the channel (blocking); raises when the channel is gone.
Send = Callable[[codec.Encoded], None]
#: Called (under the mux lock: keep it short, never call back into the mux) when a stream ends.
OnDone = Callable[["Stream"], None]
#: ``on_accept(conn, addr)`` for a listener; runs on the pump thread outside the lock.
OnAccept = Callable[[socket.socket, Any], None]

#: A peer cannot push our send credit past this (bounds nothing of ours, but keeps numbers sane).
MAX_CREDIT = 1 << 32
#: Bytes per stream frame: small enough that a command frame never waits long behind one.
STREAM_CHUNK = 512 * 1024
DEFAULT_MAX_STREAMS = 1024
_RESET_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s


def arm_reset(sock: socket.socket) -> None:
    """Make ``sock.close()`` send a RST instead of a FIN (an aborted stream's socket, a
    relay's): ``SO_LINGER`` on, 0 s. A socket that refuses it closes as it would have."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)
    except OSError:
        pass


class StreamClosed(Exception):
    """The stream was reset (by the peer, the mux, or a lost channel)."""


class StreamLimit(Exception):
    """Too many streams are open."""


class Stream:
    """One relayed connection (state owned by the mux; read-only for others)."""

    def __init__(self, sid: int, sock: socket.socket | None, send: Send, on_done: OnDone | None, reading: bool):
        self.id = sid
        self.sock = sock
        self.send = send
        self.on_done = on_done
        self.credit = TCP_WINDOW  # bytes we may still send
        self.recv_window = TCP_WINDOW  # bytes the peer may still send us
        self.outbuf: deque[list[Any]] = deque()  # [memoryview, grantable] waiting for the local socket
        self.out_bytes = 0
        self.ungranted = 0  # bytes written locally, not yet granted back
        self.reading = reading  # False: don't read the socket yet (the peer side is being set up)
        self.grown = False  # our larger receive window was granted
        self.local_eof = False  # our side sent its EOF
        self.peer_eof = False  # the peer sent its EOF
        self.shut_wr = False  # the local socket's write side is shut down
        self.done = False
        self.aborted = False
        self.mask = 0  # selector interest registered
        self.inbuf = bytearray()  # pending streams: received, not yet consumed
        self.sent = 0
        self.received = 0
        self.reason = ""
        self.user: Any = None  # free for the owner (e.g. the forward a stream belongs to)


class StreamMux:
    """The streams of one end of a channel (see the module docstring)."""

    def __init__(self, name: str = "mvm-tcp", *, window: int = TCP_WINDOW,
                 max_streams: int = DEFAULT_MAX_STREAMS):
        self.window = max(int(window), TCP_WINDOW)
        self.grant_step = codec.grant_step(self.window)
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._streams: dict[int, Stream] = {}
        self._dirty: set[Stream] = set()
        self._notices: list[tuple[Send, codec.Encoded, Stream | None]] = []
        self._listeners: dict[int, tuple[socket.socket, OnAccept]] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- public: streams ---------------------------------------------------------------

    def attach(self, sid: int, sock: socket.socket, send: Send, *, reading: bool = True,
               on_done: OnDone | None = None, first_frame: bytes | None = None, user: Any = None) -> Stream:
        """Relay ``sock`` as stream ``sid``. ``first_frame`` is sent before any of its bytes
        (``tcp.open``); with ``reading=False`` the socket is not read until ``start_reading``
        (its peer is not connected yet), though bytes from the peer are written to it."""
        _prepare(sock)
        with self._lock:
            self._admit(sid)
            stream = Stream(sid, sock, send, on_done, reading)
            stream.user = user
            self._streams[sid] = stream
            if first_frame is not None:
                self._notices.append((send, first_frame, stream))
            if reading:  # the peer knows the stream (or learns it from first_frame): grow our window
                self._grow_window(stream)
            self._dirty.add(stream)
        self._wake()
        return stream

    def pending(self, sid: int, send: Send, *, on_done: OnDone | None = None, user: Any = None) -> PendingStream:
        """A stream without a socket yet: a handler thread talks through the returned object."""
        with self._lock:
            self._admit(sid)
            stream = Stream(sid, None, send, on_done, reading=False)
            stream.user = user
            self._streams[sid] = stream
        return PendingStream(self, stream)

    def start_reading(self, sid: int) -> bool:
        with self._lock:
            stream = self._streams.get(sid)
            if stream is None:
                return False
            stream.reading = True
            self._grow_window(stream)
            self._dirty.add(stream)
        self._wake()
        return True

    def abort(self, sid: int, reason: str, *, notify: bool = True, send: Send | None = None) -> None:
        """Reset stream ``sid`` here; with ``notify`` tell the peer (``tcp.close``). For a
        stream we do not know (e.g. a refused ``tcp.open``), ``send`` tells the peer."""
        with self._lock:
            stream = self._streams.get(sid)
            if stream is not None:
                self._abort_locked(stream, reason, notify=notify)
            elif notify and send is not None:
                self._notices.append((send, codec.event("tcp.close", stream=sid, reason=reason[:200]), None))
        self._wake()

    def reset_all(self, reason: str) -> int:
        """The channel is gone: reset every stream without telling anyone."""
        with self._lock:
            streams = list(self._streams.values())
            for stream in streams:
                self._abort_locked(stream, reason, notify=False)
        self._wake()
        return len(streams)

    def get(self, sid: int) -> Stream | None:
        with self._lock:
            return self._streams.get(sid)

    def has(self, sid: int) -> bool:
        with self._lock:
            return sid in self._streams

    def count(self) -> int:
        with self._lock:
            return len(self._streams)

    # ---- public: listeners ---------------------------------------------------------------

    def add_listener(self, sock: socket.socket, on_accept: OnAccept) -> None:
        """Accept connections on ``sock`` (on the pump thread) and hand each to ``on_accept``."""
        sock.setblocking(False)
        with self._lock:  # (epoll registration is safe while the pump waits in select)
            if self._closed:
                raise StreamClosed("the stream mux is closed")
            self._listeners[sock.fileno()] = (sock, on_accept)
            self._selector.register(sock, selectors.EVENT_READ, ("listen", sock))

    def remove_listener(self, sock: socket.socket) -> None:
        """Stop accepting on ``sock`` and close it at once (accepted connections go on)."""
        with self._lock:
            try:
                if self._listeners.pop(sock.fileno(), None) is not None:
                    self._selector.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
            finally:
                sock.close()

    # ---- the channel's reader ------------------------------------------------------------

    def feed(self, frame: Frame) -> None:
        """A ``data`` frame of stream ``tcp`` or a ``tcp.window``/``tcp.close`` event from the
        peer. Never blocks (``tcp.open`` is the owner's business: it calls ``attach``/``pending``)."""
        header = frame.header
        wake = False
        with self._lock:
            if frame.kind == "data":
                if header["stream"] != TCP_STREAM:
                    return  # not stream bytes (the owner routes only these here; be sure)
                stream = self._streams.get(header["id"])
                if stream is None:
                    return  # already gone here (reset crossed in flight)
                wake = self._on_data(stream, frame.payload, header.get("eof") is True)
            elif header["event"] == "tcp.window":
                stream = self._streams.get(header["stream"])
                if stream is None:
                    return
                stream.credit = min(stream.credit + int(header["bytes"]), MAX_CREDIT)
                self._cond.notify_all()
                wake = stream.sock is not None and not stream.mask & selectors.EVENT_READ
                if wake:
                    self._dirty.add(stream)
            elif header["event"] == "tcp.close":
                stream = self._streams.get(header["stream"])
                if stream is None:
                    return
                self._abort_locked(stream, "reset by the peer: " + str(header.get("reason") or "closed"),
                                   notify=False)
                wake = True
        if wake:
            self._wake()

    def _on_data(self, stream: Stream, payload: bytes, eof: bool) -> bool:
        size = len(payload)
        if stream.peer_eof and (size or eof):
            self._abort_locked(stream, "protocol: data after EOF", notify=True)
            return True
        if size > stream.recv_window:
            self._abort_locked(stream, f"protocol: {size} bytes sent with {stream.recv_window} bytes of credit",
                               notify=True)
            return True
        stream.recv_window -= size
        stream.received += size
        if stream.sock is None:  # pending: a handler thread reads it
            stream.inbuf += payload
            stream.peer_eof = stream.peer_eof or eof
            self._cond.notify_all()
            return False
        if size:
            stream.outbuf.append([memoryview(payload), True])
            stream.out_bytes += size
        if eof:
            stream.peer_eof = True
        if eof or not stream.mask & selectors.EVENT_WRITE:
            self._dirty.add(stream)
            return True
        return False

    # ---- internals (lock held) ---------------------------------------------------------------

    def _admit(self, sid: int) -> None:
        if self._closed:
            raise StreamClosed("the stream mux is closed")
        if sid in self._streams:
            raise ValueError(f"stream {sid} is already open")
        if len(self._streams) >= self.max_streams:
            raise StreamLimit(f"{self.max_streams} streams are already open")

    def _grow_window(self, stream: Stream) -> None:
        """Receive windows larger than the protocol's initial one are granted up front (once
        the peer knows the stream: a grant for a stream it does not know yet would be lost)."""
        extra = self.window - TCP_WINDOW
        if extra > 0 and not stream.grown:
            stream.grown = True
            stream.recv_window += extra
            self._notices.append((stream.send, codec.event("tcp.window", stream=stream.id, bytes=extra), stream))

    def _abort_locked(self, stream: Stream, reason: str, *, notify: bool) -> None:
        if stream.done:
            return
        if notify:
            self._notices.append((stream.send, codec.event("tcp.close", stream=stream.id, reason=reason[:200]), None))
        stream.reason = reason
        stream.aborted = True
        sock = stream.sock
        if sock is not None:
            arm_reset(sock)
        self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        stream.done = True
        self._streams.pop(stream.id, None)
        self._dirty.discard(stream)
        sock = stream.sock
        if sock is not None:
            if stream.mask:
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError, OSError):
                    pass
                stream.mask = 0
            sock.close()
        stream.outbuf.clear()
        self._cond.notify_all()
        if stream.on_done is not None:
            try:
                stream.on_done(stream)
            except Exception:  # an owner's bookkeeping must not break the pump
                pass

    def _interest(self, stream: Stream) -> None:
        if stream.done or stream.sock is None:
            return
        if stream.peer_eof and not stream.outbuf and not stream.shut_wr:
            try:
                stream.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            stream.shut_wr = True
        if stream.local_eof and stream.shut_wr:
            self._forget(stream)  # both directions finished
            return
        mask = 0
        if stream.reading and not stream.local_eof and stream.credit > 0:
            mask |= selectors.EVENT_READ
        if stream.outbuf:
            mask |= selectors.EVENT_WRITE
        if mask == stream.mask:
            return
        try:
            if not stream.mask:
                self._selector.register(stream.sock, mask, stream)
            elif not mask:
                self._selector.unregister(stream.sock)
            else:
                self._selector.modify(stream.sock, mask, stream)
        except (KeyError, ValueError, OSError) as exc:
            self._abort_locked(stream, f"socket unusable: {exc}", notify=True)
            return
        stream.mask = mask

    def _read(self, stream: Stream, out: list[tuple[Send, codec.Encoded, Stream | None]]) -> None:
        size = min(stream.credit, STREAM_CHUNK)
        if size <= 0 or stream.sock is None:
            return
        try:
            data = stream.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._abort_locked(stream, f"connection failed: {exc.strerror or exc}", notify=True)
            return
        if not data:
            stream.local_eof = True
            out.append((stream.send, codec.data_parts(stream.id, TCP_STREAM, b"", eof=True), stream))
            return
        stream.credit -= len(data)
        stream.sent += len(data)
        out.append((stream.send, codec.data_parts(stream.id, TCP_STREAM, data), stream))

    def _write(self, stream: Stream, out: list[tuple[Send, codec.Encoded, Stream | None]]) -> None:
        sock = stream.sock
        assert sock is not None
        while stream.outbuf:
            entry = stream.outbuf[0]
            view: memoryview = entry[0]
            try:
                written = sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._abort_locked(stream, f"connection failed: {exc.strerror or exc}", notify=True)
                return
            stream.out_bytes -= written
            if entry[1]:
                stream.ungranted += written
            if written < len(view):
                entry[0] = view[written:]
                break
            stream.outbuf.popleft()
        if stream.ungranted >= self.grant_step and not stream.peer_eof:
            grant, stream.ungranted = stream.ungranted, 0
            stream.recv_window += grant
            out.append((stream.send, codec.event("tcp.window", stream=stream.id, bytes=grant), stream))

    # ---- the pump -------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception:  # keep relaying whatever one stream did
                time.sleep(0.01)

    def _step(self) -> bool:
        events = self._selector.select()
        out: list[tuple[Send, codec.Encoded, Stream | None]] = []
        accepted: list[tuple[OnAccept, socket.socket, Any]] = []
        with self._lock:
            for key, mask in events:
                data = key.data
                if data is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                elif isinstance(data, Stream):
                    if data.done:
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self._write(data, out)
                    if mask & selectors.EVENT_READ and not data.done:
                        self._read(data, out)
                    self._dirty.add(data)
                else:
                    self._accept(data[1], accepted)
            dirty, self._dirty = self._dirty, set()
            for stream in dirty:
                self._interest(stream)
            if self._notices:
                out.extend(self._notices)
                self._notices = []
            closed = self._closed
        for send, frame, owner in out:
            if owner is not None and owner.aborted and isinstance(frame, tuple):  # (data frames are parts)
                continue  # reset meanwhile: its bytes would only be refused
            try:
                send(frame)
            except Exception as exc:  # the channel is gone: so are its streams
                if owner is not None:
                    with self._lock:
                        self._abort_locked(owner, f"channel closed: {exc}", notify=False)
        for on_accept, conn, addr in accepted:
            try:
                on_accept(conn, addr)
            except Exception:
                conn.close()
        return not closed

    def _accept(self, listener: socket.socket, accepted: list[tuple[OnAccept, socket.socket, Any]]) -> None:
        entry = self._listeners.get(listener.fileno())
        if entry is None or entry[0] is not listener:
            return
        for _ in range(64):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            accepted.append((entry[1], conn, addr))

    def close(self) -> None:
        """Reset every stream, close every listener, end the pump."""
        self.reset_all("closing")
        with self._lock:
            for sock, _ in list(self._listeners.values()):
                sock.close()
            self._listeners.clear()
            self._closed = True
        self._wake()


def _prepare(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class PendingStream:
    """A stream without a socket yet, driven by one handler thread."""

    def __init__(self, mux: StreamMux, stream: Stream):
        self._mux = mux
        self.stream = stream
        self.id = stream.id

    def recv(self, max_bytes: int, timeout: float) -> bytes:
        """Up to ``max_bytes`` from the peer; ``b""`` at its EOF. Consumed bytes are granted
        back at once. Raises ``TimeoutError`` or ``StreamClosed``."""
        mux, stream = self._mux, self.stream
        deadline = time.monotonic() + timeout
        with mux._cond:
            while not stream.inbuf and not stream.peer_eof and not stream.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no bytes from the peer in time")
                mux._cond.wait(remaining)
            if stream.done:
                raise StreamClosed(stream.reason or "stream closed")
            data = bytes(stream.inbuf[:max_bytes])
            del stream.inbuf[: len(data)]
            if data:
                stream.recv_window += len(data)
        if data:
            stream.send(codec.event("tcp.window", stream=stream.id, bytes=len(data)))
        return data

    def send(self, data: bytes, *, eof: bool = False, timeout: float = 10.0) -> None:
        """Send bytes (within the peer's credit) and optionally our EOF."""
        mux, stream = self._mux, self.stream
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view or eof:
            with mux._cond:
                while view and stream.credit <= 0 and not stream.done:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("the peer granted no credit in time")
                    mux._cond.wait(remaining)
                if stream.done:
                    raise StreamClosed(stream.reason or "stream closed")
                piece = bytes(view[: min(stream.credit, STREAM_CHUNK)])
                stream.credit -= len(piece)
                stream.sent += len(piece)
                view = view[len(piece):]
                last = eof and not view
                if last:
                    stream.local_eof = True
            stream.send(codec.data_parts(stream.id, TCP_STREAM, piece, **({"eof": True} if last else {})))
            if last:
                return

    def attach(self, sock: socket.socket, prefix: bytes = b"") -> None:
        """Hand the stream to the pump, relayed to ``sock``; ``prefix`` is written to ``sock``
        first, then whatever the peer sent that ``recv`` did not consume."""
        _prepare(sock)
        mux, stream = self._mux, self.stream
        with mux._lock:
            if stream.done:
                sock.close()
                raise StreamClosed(stream.reason or "stream closed")
            stream.sock = sock
            if prefix:
                stream.outbuf.append([memoryview(prefix), False])
                stream.out_bytes += len(prefix)
            if stream.inbuf:
                rest = bytes(stream.inbuf)
                stream.inbuf.clear()
                stream.outbuf.append([memoryview(rest), True])
                stream.out_bytes += len(rest)
            stream.reading = True
            mux._grow_window(stream)
            mux._dirty.add(stream)
        mux._wake()

    def finish(self, timeout: float = 5.0) -> None:
        """After our EOF: discard what the peer still sends until its EOF, then forget the
        stream (reset it if the peer does not finish within ``timeout``)."""
        deadline = time.monotonic() + timeout
        try:
            while self.recv(CHUNK_SIZE, max(deadline - time.monotonic(), 0.0)):
                pass
        except (TimeoutError, StreamClosed):
            self.abort("the peer did not finish")
            return
        with self._mux._lock:
            if not self.stream.done:
                self._mux._forget(self.stream)

    def abort(self, reason: str) -> None:
        self._mux.abort(self.id, reason)


def id_counter(first: int) -> Callable[[], int]:
    """Stream ids of one side: the host uses odd ids (``id_counter(1)``), the guest even ones."""
    counter = itertools.count(first, 2)
    lock = threading.Lock()

    def next_id() -> int:
        with lock:
            return next(counter)

    return next_id


__all__ = ["PendingStream", "Stream", "StreamClosed", "StreamLimit", "StreamMux", "id_counter"]
