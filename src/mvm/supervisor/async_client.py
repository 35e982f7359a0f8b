"""asyncio client of the supervisor's control socket (used by ``mvm.AsyncSandbox``).

The same sans-I/O codec as ``SupervisorClient``, over asyncio streams: one reader task
per connection feeds a ``FrameDecoder`` and hands each frame to the queue of the request
it answers, so many tasks share one connection without waiting on each other. A task
cancelled while its request runs sends the request's ``cancel`` frame (the supervisor
then kills an ``exec.run``'s process group and ends a ``proc.attach``/``proc.wait``).
The protocol logic (hello, request ids, answer routing and unwrapping, connection errors)
is ``client_core``'s, shared with ``SupervisorClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from .. import errors
from ..protocol import codec
from ..protocol.codec import Frame, FrameDecoder, ProtocolError
from . import client_core
from .client_core import ConnectionEnded, DataCallback, Grants, PendingRequests, Request, answer
from .session import MAX_INFLIGHT

READ_SIZE = 1024 * 1024


class AsyncSupervisorClient:
    """A connection to one sandbox's supervisor, for one event loop. Open it with
    ``await AsyncSupervisorClient.open(path)``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: dict[str, Any], directory: Path
    ):
        self._directory = directory  # the sandbox's: tells a destroyed sandbox from a lost one
        self._reader = reader
        self._writer = writer
        self.peer = peer
        self._decoder = FrameDecoder()
        self._pending: PendingRequests[asyncio.Queue[Any]] = PendingRequests()
        # The supervisor refuses more than MAX_INFLIGHT requests per connection: the rest wait
        # here, in arrival order, instead of failing with TooLarge.
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._closed = False
        self._ended: ConnectionEnded | None = None  # set by the reader task when the connection ends
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(), name="mvm-async-client-reader")

    @classmethod
    async def open(
        cls, socket_path: Path, *, connect_timeout: float = 5.0, on_behalf_of: dict[str, str] | None = None
    ) -> AsyncSupervisorClient:
        """Connect and shake hands. ``on_behalf_of`` names who this client acts for (an MCP
        client, say; see ``client_core.hello``)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(socket_path), limit=READ_SIZE), connect_timeout
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise client_core.not_running(exc, socket_path.parent) from None
        decoder = FrameDecoder()
        try:
            writer.write(client_core.hello(on_behalf_of))
            frames: list[Frame] = []
            while not frames:
                chunk = await asyncio.wait_for(reader.read(READ_SIZE), connect_timeout)
                if not chunk:
                    raise ProtocolError("supervisor closed the connection before its hello")
                frames = decoder.feed(chunk)
            peer = client_core.accept_hello(frames[0])
        except (ProtocolError, OSError, TimeoutError) as exc:
            writer.close()
            raise client_core.handshake_failed(exc) from None
        except BaseException:
            writer.close()
            raise
        client = cls(reader, writer, peer, socket_path.parent)
        client._decoder = decoder
        for frame in frames[1:]:
            client._deliver(frame)
        return client

    # -- public ---------------------------------------------------------------

    async def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        on_data: DataCallback | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request; deliver its ``data`` frames to ``on_data``; return the final
        result and payload, or raise the mapped ``MvmError``. ``timeout`` bounds the whole
        call; cancelling the awaiting task cancels the request in the supervisor. With
        ``on_data`` the data frames are flow-controlled: granted back as ``on_data`` returns."""
        ident, box = await self._open(op, args, payload, window=Grants.WINDOW if on_data is not None else None)
        grants = Grants(ident)
        finished = False
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await box.get()
                    finished = isinstance(item, ConnectionEnded) or item.kind != "data"
                    done = answer(op, item, on_data)
                    if done is not None:
                        return done
                    self._grant(grants, len(item.payload))
        except TimeoutError:
            raise client_core.no_answer(op, timeout) from None
        finally:
            self._done(ident)
            if not finished:
                self._cancel(ident)

    async def call_many(self, requests: Sequence[Request]) -> list[tuple[dict[str, Any], bytes]]:
        """Send every request, then wait for every answer (``Transport.call_many``);
        cancelling the awaiting task cancels those still in flight."""
        outcomes = await asyncio.gather(*(self.call(op, args, payload) for op, args, payload in requests),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, errors.MvmError):
                raise outcome
        return client_core.all_answered(outcomes)  # type: ignore[arg-type]

    async def stream(
        self, op: str, args: dict[str, Any] | None = None, *, idle_timeout: float | None = None
    ) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(stream, bytes)`` of ``data`` frames until the response. With
        ``idle_timeout`` a request that sends nothing for that long is cancelled and
        ``StreamIdle`` raised, so a silent process never hangs its reader. Closing the
        iterator early (or cancelling its task) cancels the request. Flow-controlled as
        ``SupervisorClient.stream``: a caller that stops reading holds at most ``Grants.WINDOW``."""
        ident, box = await self._open(op, args, b"", window=Grants.WINDOW)
        grants = Grants(ident)
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(box.get(), idle_timeout)
                except TimeoutError:
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
            self._done(ident)
            if not finished:
                self._cancel(ident)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self._read_task
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    # -- internals ------------------------------------------------------------

    async def _open(self, op: str, args: dict[str, Any] | None, payload: bytes, *,
                    window: int | None = None) -> tuple[int, asyncio.Queue[Any]]:
        if self._closed:
            raise client_core.handle_closed()
        if self._ended is not None:  # the reader is done: nobody would fill the box
            raise self._ended.error(op)
        await self._slots.acquire()
        box: asyncio.Queue[Any] = asyncio.Queue()  # bounded by the request's window, if it has one
        ident, request = self._pending.open(op, args, payload, box, window=window)
        try:
            if isinstance(request, bytes):
                self._writer.write(request)
            else:
                self._writer.writelines(request)
            await self._writer.drain()
        except BaseException as exc:
            self._done(ident)
            self._cancel(ident)  # cancelled while flushing: the request may have gone out
            if isinstance(exc, (ConnectionError, OSError)):
                raise await asyncio.to_thread(client_core.gone, op, self._directory) from None
            raise
        return ident, box

    def _done(self, ident: int) -> None:
        if self._pending.finish(ident):
            self._slots.release()

    def _grant(self, grants: Grants, size: int) -> None:
        grant = grants.took(size)
        if grant is not None and not self._closed and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError, OSError):
                self._writer.write(grant)  # (small: the transport buffers it, the writer flushes it)

    def _cancel(self, ident: int) -> None:
        # Synchronous on purpose: it runs in ``finally`` of a cancelled task, where awaiting
        # would be cancelled again. The transport buffers it; the writer flushes it.
        if self._closed or self._writer.is_closing():
            return
        with contextlib.suppress(ConnectionError, OSError):
            self._writer.write(codec.cancel(ident))

    def _deliver(self, frame: Frame) -> None:
        box = self._pending.box_of(frame)
        if box is not None:
            box.put_nowait(frame)

    async def _read_loop(self) -> None:
        lost = False
        try:
            try:
                while True:
                    chunk = await self._reader.read(READ_SIZE)
                    if not chunk:
                        break
                    for frame in self._decoder.feed(chunk):
                        self._deliver(frame)
            except (ProtocolError, ConnectionError, OSError):
                pass
            if not self._closed:  # the supervisor ended the connection: was the sandbox destroyed, or lost?
                lost = await asyncio.to_thread(client_core.supervisor_died, self._directory)
        finally:  # cancelled too (aclose, the loop's end): every waiter hears of the end
            self._ended = ConnectionEnded(self._directory, lost)
            for box in self._pending.boxes():
                box.put_nowait(self._ended)
