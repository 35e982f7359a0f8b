"""The supervisor's side of the agent channel: requests with ids, events to a handler.

The link can be re-attached to a new socket (a VM restored from a snapshot, a
namespace sandbox started again); requests in flight on the old channel fail
with ``SandboxError``.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from .. import errors
from ..protocol import codec
from ..protocol.channel import ChannelClosed, FramedChannel
from ..protocol.codec import Frame, ProtocolError

EventHandler = Callable[[Frame], None]
_LOST = object()

#: How long one agent request may take before the supervisor gives up on it.
DEFAULT_AGENT_TIMEOUT = 60.0


class AgentLink:
    def __init__(self, on_event: EventHandler, on_lost: Callable[[str], None]):
        self._on_event = on_event
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue[Any]] = {}
        self._lock = threading.Lock()
        self._channel: FramedChannel | None = None
        self._generation = 0
        self.agent_hello: dict[str, Any] = {}
        #: TCP stream frames (``data`` and ``tcp.*`` events) go here instead of ``on_event``.
        self.on_stream: EventHandler | None = None
        #: Called whenever the channel is replaced or lost (its TCP streams are gone with it).
        self.on_change: list[Callable[[], None]] = []

    def attach(self, sock: socket.socket, *, timeout: float = 30.0) -> dict[str, Any]:
        """Take a fresh socket to the agent: hello both ways, start reading."""
        sock.settimeout(timeout)
        channel = FramedChannel(sock)
        try:
            channel.send_raw(codec.hello("supervisor"))
            # After a VM restore the guest may still flush frames it was sending when the
            # snapshot was taken: skip (a bounded number of) them until the agent's hello.
            for _ in range(1024):
                frame = channel.recv()
                if frame.kind == "hello":
                    hello = codec.check_hello(frame)
                    break
            else:
                raise ProtocolError("no hello from the agent among its first 1024 frames")
        except (ChannelClosed, ProtocolError, OSError) as exc:
            channel.close()
            raise errors.SandboxError(f"the guest agent did not answer hello: {exc}") from None
        sock.settimeout(None)
        generation = self._replace_channel(channel)
        self.agent_hello = hello
        threading.Thread(target=self._read_loop, args=(channel, generation), name="mvm-agent-reader",
                         daemon=True).start()
        return hello

    def detach(self) -> None:
        self._replace_channel(None)

    def _replace_channel(self, channel: FramedChannel | None) -> int:
        """Put ``channel`` in place of the current one (closed), fail every call waiting on
        the old one with ``_LOST``, tell the listeners; returns the new generation."""
        with self._lock:
            old, self._channel = self._channel, channel
            self._generation += 1
            generation = self._generation
            stale = list(self._waiting.values())
            self._waiting.clear()
        if old is not None:
            old.close()
        for box in stale:
            box.put(_LOST)
        self._changed()
        return generation

    def _changed(self) -> None:
        for callback in list(self.on_change):
            try:
                callback()
            except Exception:
                pass

    def send(self, encoded: codec.Encoded) -> None:
        """Put one already-encoded frame on the current channel (TCP stream frames)."""
        channel = self._channel
        if channel is None:
            raise errors.InvalidState("the sandbox is not running (no agent connection)")
        try:
            channel.send_raw(encoded)
        except ChannelClosed:
            raise errors.SandboxError("the guest agent connection is closed") from None

    @property
    def attached(self) -> bool:
        return self._channel is not None

    def call(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"",
             *, timeout: float | None = DEFAULT_AGENT_TIMEOUT) -> tuple[dict[str, Any], bytes]:
        ident = next(self._ids)
        box: queue.Queue[Any] = queue.Queue()
        with self._lock:
            channel = self._channel
            if channel is None:
                raise errors.InvalidState("the sandbox is not running (no agent connection)")
            self._waiting[ident] = box
        try:
            channel.send_raw(codec.request(ident, op, args, payload))
            try:
                item = box.get(timeout=timeout)
            except queue.Empty:
                raise errors.SandboxError(f"the guest agent did not answer {op} within {timeout} s") from None
            if item is _LOST:
                raise errors.SandboxError(f"the guest agent connection was lost during {op}")
            frame: Frame = item
            if frame.header.get("ok"):
                return dict(frame.header.get("result") or {}), frame.payload
            raise errors.from_wire(frame.header.get("error") or {})
        except ChannelClosed:
            raise errors.SandboxError(f"the guest agent connection is closed ({op})") from None
        finally:
            with self._lock:
                self._waiting.pop(ident, None)

    def _dispatch(self, frame: Frame) -> None:
        if frame.kind == "event":
            if self.on_stream is not None and frame.header["event"] in codec.TCP_EVENTS:
                self.on_stream(frame)
            else:
                self._on_event(frame)
        elif frame.kind == "data":
            if self.on_stream is not None:
                self.on_stream(frame)
        elif frame.kind == "response":
            with self._lock:
                box = self._waiting.get(frame.id) if frame.id is not None else None
            if box is not None:
                box.put(frame)

    def _read_loop(self, channel: FramedChannel, generation: int) -> None:
        reason = "the agent closed the channel"
        try:
            while True:
                frame = channel.recv()
                try:
                    self._dispatch(frame)
                except Exception as exc:  # a well-framed lie (an event without its fields, ...)
                    raise ProtocolError(f"unusable {frame.kind} frame: {type(exc).__name__}: {exc}") from None
        except ProtocolError as exc:
            reason = f"the agent broke the protocol: {exc}"
            channel.close()  # the guest is not to be trusted with the rest of this stream
        except (ChannelClosed, OSError) as exc:
            reason = f"agent channel closed: {exc}"
        with self._lock:
            current = generation == self._generation
            if current:
                self._channel = None
                stale = list(self._waiting.values())
                self._waiting.clear()
            else:
                stale = []
        for box in stale:
            box.put(_LOST)
        if current:
            self._changed()
            self._on_lost(reason)
