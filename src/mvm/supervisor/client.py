"""Client side of the supervisor's control socket (used by the SDK and mvmctl).

One connection, one reader thread; each request gets its own queue so several
threads (a ``commands.run``, a ``Process.stdout`` iterator, a ``logs(follow=True)``)
can share a sandbox handle without blocking each other. The protocol logic (hello,
request ids, answer routing and unwrapping, connection errors) is ``client_core``'s,
shared with ``AsyncSupervisorClient``.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import errors
from ..protocol import codec
from ..protocol.channel import ChannelClosed, FramedChannel
from ..protocol.codec import ProtocolError
from . import client_core
from .client_core import ConnectionEnded, DataCallback, Grants, PendingRequests, Request, answer

__all__ = ["DataCallback", "SupervisorClient"]


class SupervisorClient:
    """A connection to one sandbox's supervisor."""

    def __init__(
        self, socket_path: Path, *, connect_timeout: float = 5.0, on_behalf_of: dict[str, str] | None = None
    ):
        self._directory = socket_path.parent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise client_core.not_running(exc, socket_path.parent) from None
        self._channel = FramedChannel(sock)
        try:  # still under connect_timeout: a supervisor that accepts but never answers must not hang us
            self._channel.send_raw(client_core.hello(on_behalf_of))
            self.peer = client_core.accept_hello(self._channel.recv())
        except (ChannelClosed, ProtocolError, OSError) as exc:
            self._channel.close()
            raise client_core.handshake_failed(exc) from None
        except BaseException:
            self._channel.close()
            raise
        sock.settimeout(None)
        self._pending: PendingRequests[queue.SimpleQueue[Any]] = PendingRequests()
        self._lock = threading.Lock()
        self._closed = False
        self._ended: ConnectionEnded | None = None  # set by the reader when the connection ends
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
        final result and payload, or raise the mapped ``MvmError``. With ``on_data`` the data
        frames are flow-controlled: granted back as ``on_data`` returns."""
        ident, box = self._open(op, args, payload, window=Grants.WINDOW if on_data is not None else None)
        grants = Grants(ident)
        try:
            while True:
                try:
                    item = box.get(timeout=timeout)
                except queue.Empty:
                    self._cancel(ident)
                    raise client_core.no_answer(op, timeout) from None
                done = answer(op, item, on_data)
                if done is not None:
                    return done
                self._grant(grants, len(item.payload))
        finally:
            self._finish(ident)

    def call_many(self, requests: Sequence[Request]) -> list[tuple[dict[str, Any], bytes]]:
        """Send every request, then wait for every answer (``Transport.call_many``)."""
        opened: list[tuple[str, int, queue.SimpleQueue[Any]]] = []
        try:
            for op, args, payload in requests:
                opened.append((op, *self._open(op, args, payload)))
            outcomes: list[tuple[dict[str, Any], bytes] | errors.MvmError] = []
            for op, _ident, box in opened:
                try:
                    done = None
                    while done is None:
                        done = answer(op, box.get(), None)
                    outcomes.append(done)
                except errors.MvmError as exc:
                    outcomes.append(exc)
            return client_core.all_answered(outcomes)
        finally:
            for _op, ident, _box in opened:
                self._finish(ident)

    def stream(
        self, op: str, args: dict[str, Any] | None = None, *, idle_timeout: float | None = None
    ) -> Iterator[tuple[str, bytes]]:
        """Yield ``(stream, bytes)`` of ``data`` frames until the response; closing the
        iterator early cancels the request. With ``idle_timeout`` a request that sends
        nothing for that long is cancelled and ``StreamIdle`` raised. Flow-controlled: the
        supervisor sends on as the caller takes what was yielded, so a caller that stops
        reading holds at most ``Grants.WINDOW`` bytes here (the process waits meanwhile)."""
        ident, box = self._open(op, args, b"", window=Grants.WINDOW)
        grants = Grants(ident)
        finished = False
        try:
            while True:
                try:
                    item = box.get(timeout=idle_timeout)
                except queue.Empty:
                    raise client_core.stream_idle(op, idle_timeout) from None
                if isinstance(item, ConnectionEnded):
                    finished = True
                    if item.lost:
                        raise item.error(op)
                    return  # the sandbox was destroyed: its stream ends
                if item.kind == "data":
                    yield item.header["stream"], item.payload
                    self._grant(grants, len(item.payload))  # the caller took it: send more
                    continue
                finished = True
                answer(op, item, None)
                return
        finally:
            if not finished:
                self._cancel(ident)
            self._finish(ident)

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    # -- internals ------------------------------------------------------------

    def _open(self, op: str, args: dict[str, Any] | None, payload: bytes, *,
              window: int | None = None) -> tuple[int, queue.SimpleQueue[Any]]:
        if self._closed:
            raise client_core.handle_closed()
        # (holds at most the request's window, if it has one; a Queue costs three Conditions a request)
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._lock:
            ended = self._ended
            if ended is None:
                ident, request = self._pending.open(op, args, payload, box, window=window)
        if ended is not None:  # the reader is done: nobody would fill the box
            raise ended.error(op)
        try:
            self._channel.send_raw(request)
        except ChannelClosed:
            self._finish(ident)
            raise client_core.gone(op, self._directory) from None
        return ident, box

    def _finish(self, ident: int) -> None:
        with self._lock:
            self._pending.finish(ident)

    def _grant(self, grants: Grants, size: int) -> None:
        grant = grants.took(size)
        if grant is not None:
            try:
                self._channel.send_raw(grant)
            except ChannelClosed:
                pass  # the reader hears of the end

    def _cancel(self, ident: int) -> None:
        try:
            self._channel.send_raw(codec.cancel(ident))
        except ChannelClosed:
            pass

    def _read_loop(self) -> None:
        try:
            while True:
                frame = self._channel.recv()
                with self._lock:
                    box = self._pending.box_of(frame)
                if box is not None:
                    box.put(frame)
        except (ChannelClosed, ProtocolError, OSError):
            pass
        finally:
            ended = ConnectionEnded(self._directory, not self._closed and client_core.supervisor_died(self._directory))
            with self._lock:
                self._ended = ended
                boxes = self._pending.boxes()
            for box in boxes:
                box.put(ended)
