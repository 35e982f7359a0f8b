"""asyncio client of the supervisor's control socket (used by ``mvm.AsyncSandbox``).

The same sans-I/O codec as ``SupervisorClient``, over asyncio streams: one reader task
per connection feeds a ``FrameDecoder`` and hands each frame to the queue of the request
it answers, so many tasks share one connection without waiting on each other. A task
cancelled while its request runs sends the request's ``cancel`` frame (the supervisor
then kills an ``exec.run``'s process group and ends a ``proc.attach``/``proc.wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from .. import errors
from ..protocol import codec
from ..protocol.codec import Frame, FrameDecoder, ProtocolError
from .client import unwrap_response
from .session import MAX_INFLIGHT

DataCallback = Callable[[str, bytes], None]
READ_SIZE = 1024 * 1024
_CLOSED = object()


class AsyncSupervisorClient:
    """A connection to one sandbox's supervisor, for one event loop. Open it with
    ``await AsyncSupervisorClient.open(path)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: dict[str, Any]):
        self._reader = reader
        self._writer = writer
        self.peer = peer
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Queue[Any]] = {}
        # The supervisor refuses more than MAX_INFLIGHT requests per connection: the rest wait
        # here, in arrival order, instead of failing with TooLarge.
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._closed = False
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(), name="mvm-async-client-reader")

    @classmethod
    async def open(
        cls, socket_path: Path, *, connect_timeout: float = 5.0, on_behalf_of: dict[str, str] | None = None
    ) -> AsyncSupervisorClient:
        """Connect and shake hands. ``on_behalf_of`` names who this client acts for (an MCP
        client, say); the supervisor audits it next to this process's own credentials."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(socket_path), limit=READ_SIZE), connect_timeout
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise errors.SandboxNotFound(f"sandbox supervisor is not running ({exc})") from None
        decoder = FrameDecoder()
        try:
            writer.write(codec.hello("client", **({"on_behalf_of": on_behalf_of} if on_behalf_of else {})))
            frames: list[Frame] = []
            while not frames:
                chunk = await asyncio.wait_for(reader.read(READ_SIZE), connect_timeout)
                if not chunk:
                    raise ProtocolError("supervisor closed the connection before its hello")
                frames = decoder.feed(chunk)
            peer = codec.check_hello(frames[0])
        except (ProtocolError, OSError, TimeoutError) as exc:
            writer.close()
            raise errors.ProtocolFailure(f"supervisor handshake failed: {exc}") from None
        client = cls(reader, writer, peer)
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
        call; cancelling the awaiting task cancels the request in the supervisor."""
        ident, box = await self._open(op, args, payload)
        finished = False
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await box.get()
                    if item is _CLOSED:
                        finished = True
                        raise errors.SandboxError(
                            f"{op}: the sandbox closed the connection (it may have been destroyed)"
                        )
                    if item.kind == "data":
                        if on_data is not None:
                            on_data(item.header["stream"], item.payload)
                        continue
                    finished = True
                    return unwrap_response(item)
        except TimeoutError:
            raise errors.SandboxError(f"{op}: no answer from the sandbox within {timeout} s") from None
        finally:
            self._done(ident)
            if not finished:
                self._cancel(ident)

    async def stream(
        self, op: str, args: dict[str, Any] | None = None, *, idle_timeout: float | None = None
    ) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(stream, bytes)`` of ``data`` frames until the response. With
        ``idle_timeout`` a request that sends nothing for that long is cancelled and
        ``StreamIdle`` raised, so a silent process never hangs its reader. Closing the
        iterator early (or cancelling its task) cancels the request."""
        ident, box = await self._open(op, args, b"")
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(box.get(), idle_timeout)
                except TimeoutError:
                    raise errors.StreamIdle(
                        f"{op}: nothing from the sandbox for {idle_timeout} s", idle_timeout=idle_timeout
                    ) from None
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

    async def _open(self, op: str, args: dict[str, Any] | None, payload: bytes) -> tuple[int, asyncio.Queue[Any]]:
        if self._closed or self._read_task.done():
            raise errors.SandboxError(f"{op}: this sandbox connection is closed")
        await self._slots.acquire()
        ident = next(self._ids)
        box: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting[ident] = box
        try:
            self._writer.write(codec.request(ident, op, args, payload))
            await self._writer.drain()
        except BaseException as exc:
            self._done(ident)
            self._cancel(ident)  # cancelled while flushing: the request may have gone out
            if isinstance(exc, (ConnectionError, OSError)):
                raise errors.SandboxError(
                    f"{op}: the sandbox is gone (its supervisor closed the connection)"
                ) from None
            raise
        return ident, box

    def _done(self, ident: int) -> None:
        if self._waiting.pop(ident, None) is not None:
            self._slots.release()

    def _cancel(self, ident: int) -> None:
        # Synchronous on purpose: it runs in ``finally`` of a cancelled task, where awaiting
        # would be cancelled again. The transport buffers it; the writer flushes it.
        if self._closed or self._writer.is_closing():
            return
        with contextlib.suppress(ConnectionError, OSError):
            self._writer.write(codec.cancel(ident))

    def _deliver(self, frame: Frame) -> None:
        ident = frame.id
        box = self._waiting.get(ident) if ident is not None else None
        if box is not None:
            box.put_nowait(frame)

    async def _read_loop(self) -> None:
        try:
            while True:
                chunk = await self._reader.read(READ_SIZE)
                if not chunk:
                    return
                for frame in self._decoder.feed(chunk):
                    self._deliver(frame)
        except (ProtocolError, ConnectionError, OSError):
            pass
        finally:
            for box in list(self._waiting.values()):
                box.put_nowait(_CLOSED)

