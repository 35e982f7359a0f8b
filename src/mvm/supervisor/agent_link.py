"""The supervisor's side of the agent channel: requests with ids, events to a handler.

The link can be re-attached to a new socket (a VM restored from a snapshot, a
namespace sandbox started again, a guest agent restarted); requests in flight on
the old channel fail with ``SandboxError``. Between ``begin_restart`` and the new
agent's hello, new requests wait for it (``RESTART_WAIT``) instead of failing.

Each channel has a generation (``generation``: counted up at every attach, detach and
restart). Events reach the handler with the generation of the channel they came on, a
call knows the one it was sent on, and ``submit(..., generation=g)`` refuses (raising
``AgentReplaced``) unless channel ``g`` is still the current one: a request about a
process of an agent that has since been replaced never reaches the new agent.

With ``receive_fds`` (a backend whose agent shares this kernel and is reached over
a socketpair: namespace) the channel accepts descriptors, and an agent whose hello
says ``fd_passing`` hands connected sockets over (``hands_off_sockets``): only a
``tcp.open`` event or an answer may carry one; the taker checks what it got
(``supervisor/relay.py``), anything else is closed unread (docs/security.md).
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
from ..protocol.channel import ChannelClosed, FramedChannel, discard_fds
from ..protocol.codec import Frame, ProtocolError

EventHandler = Callable[[Frame], None]
#: An agent event (or a call's answer) and the generation of the channel it came on.
AgentEventHandler = Callable[[Frame, int], None]

#: How long one agent request may take before the supervisor gives up on it.
DEFAULT_AGENT_TIMEOUT = 60.0
#: How long a request waits for a restarting agent's hello before it fails.
RESTART_WAIT = 60.0


class AgentReplaced(Exception):
    """``submit(..., generation=g)``: channel ``g`` is no longer the agent's (it died,
    was restarted or the guest was replaced); nothing was sent."""


class _Lost:
    """Put in the box of a call whose channel went away (``why``: a restart, else None)."""

    def __init__(self, why: str | None):
        self.why = why

    def error(self, op: str) -> errors.SandboxError:
        if self.why:
            return errors.SandboxError(f"{self.why} during {op}; its answer is lost", agent_restart=True)
        return errors.SandboxError(f"the guest agent connection was lost during {op}")


class AgentLink:
    def __init__(self, on_event: AgentEventHandler, on_lost: Callable[[str], None], *, receive_fds: bool = False):
        self._receive_fds = receive_fds
        #: The current agent hands connected sockets to us (``tcp.*`` with ``handoff``).
        self.hands_off_sockets = False
        self._on_event = on_event
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.SimpleQueue[Any]] = {}
        self._answer_hooks: dict[int, AgentEventHandler] = {}
        self._lock = threading.Lock()
        self._channel: FramedChannel | None = None
        self._generation = 0
        #: The generation of the last attached agent (kept while it restarts or is detached).
        self.generation = 0
        self._attached = threading.Condition(self._lock)
        self._restarting: str | None = None  # why, between begin_restart and the new agent's hello
        #: The channel ``attach`` is saying hello on: a restart or detach meanwhile closes it,
        #: so that attach fails at once instead of holding the guest's agent port.
        self._attaching: FramedChannel | None = None
        #: The last restart: channels of a generation below the first ended for the second.
        self._restarted: tuple[int, str] | None = None
        self.agent_hello: dict[str, Any] = {}
        #: TCP stream frames (``data`` and ``tcp.*`` events) go here instead of ``on_event``.
        self.on_stream: EventHandler | None = None
        #: Called whenever the channel is replaced or lost (its TCP streams are gone with it).
        self.on_change: list[Callable[[], None]] = []

    def attach(self, sock: socket.socket, *, timeout: float = 30.0) -> dict[str, Any]:
        """Take a fresh socket to the agent: hello both ways, start reading."""
        sock.settimeout(timeout)
        channel = FramedChannel(sock, receive_fds=self._receive_fds)
        with self._lock:
            self._attaching = channel
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
            raise self._attach_failed(channel, f"the guest agent did not answer hello: {exc}") from None
        sock.settimeout(None)
        self.hands_off_sockets = False
        generation = self._replace_channel(channel, attaching=True)
        self.generation = generation
        self.agent_hello = hello
        self.hands_off_sockets = self._receive_fds and channel.passes_fds and hello.get("fd_passing") is True
        threading.Thread(target=self._read_loop, args=(channel, generation), name="mvm-agent-reader",
                         daemon=True).start()
        return hello

    def detach(self) -> int:
        """Close the channel (calls in flight fail); returns the generation every earlier
        channel is below."""
        return self._replace_channel(None)

    def begin_restart(self, why: str) -> int:
        """The agent died and a new one is coming: close its channel, fail the calls in
        flight naming ``why``; new calls wait for ``attach`` (or ``detach``). Returns the
        generation every earlier channel is below."""
        return self._replace_channel(None, restarting=why)

    def _attach_failed(self, channel: FramedChannel, problem: str) -> errors.SandboxError:
        """The error of an attach on ``channel`` that failed: ``problem``, unless a restart
        or detach closed it meanwhile (then that is named)."""
        with self._lock:
            if self._attaching is not channel:
                return self._attach_interrupted()
            self._attaching = None
        return errors.SandboxError(problem)

    def _attach_interrupted(self) -> errors.SandboxError:
        """The error of an attach that a restart or detach closed during its hello (under the lock)."""
        if self._restarting:
            return errors.SandboxError(f"{self._restarting} during hello", agent_restart=True)
        return errors.SandboxError("the guest agent connection was closed during hello")

    def _replace_channel(self, channel: FramedChannel | None, *, restarting: str | None = None,
                         attaching: bool = False) -> int:
        """Put ``channel`` in place of the current one (closed), fail every call waiting on
        the old one, tell the listeners; returns the new generation. ``attaching``: the
        channel ``attach`` said hello on (refused if a restart or detach closed it meanwhile);
        otherwise an attach under way is ended too."""
        with self._lock:
            if attaching and self._attaching is not channel:  # a restart or detach came during its hello
                refused: errors.SandboxError | None = self._attach_interrupted()
            else:
                refused = None
                interrupted = None if attaching else self._attaching
                self._attaching = None
                old, self._channel = self._channel, channel
                self._generation += 1
                generation = self._generation
                stale = list(self._waiting.values())
                self._waiting.clear()
                self._answer_hooks.clear()
                self._restarting = restarting
                if restarting is not None:
                    self._restarted = (generation, restarting)
                self._attached.notify_all()
        if refused is not None:
            assert channel is not None
            channel.close()
            raise refused
        if interrupted is not None:
            interrupted.close()  # (its attach fails at once, naming this)
        if old is not None:
            old.close()
        for box in stale:
            box.put(_Lost(restarting))
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
    def next_generation(self) -> int:
        """The generation the next attached agent gets (every current one is below it)."""
        with self._lock:
            return self._generation + 1

    @property
    def attached(self) -> bool:
        return self._channel is not None

    def call(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"",
             *, timeout: float | None = DEFAULT_AGENT_TIMEOUT,
             generation: int | None = None) -> tuple[dict[str, Any], bytes]:
        return self.submit(op, args, payload, generation=generation).wait(timeout)

    def call_for_fd(self, op: str, args: dict[str, Any], *,
                    timeout: float | None = DEFAULT_AGENT_TIMEOUT) -> tuple[dict[str, Any], int]:
        """A call whose answer brings one descriptor (``handoff``); the caller owns it."""
        frame = self.submit(op, args).wait_frame(timeout)
        if len(frame.fds) != 1:
            discard_fds(frame)
            raise errors.SandboxError(f"the guest agent answered {op} without the connection it was asked for")
        return dict(frame.header.get("result") or {}), frame.fds[0]

    def submit(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"",
               *, generation: int | None = None, on_answer: AgentEventHandler | None = None) -> PendingCall:
        """Send a request without waiting for its answer (several may be in flight: a
        streamed ``fs.read`` reads ahead); ``wait`` on the returned call, or ``forget`` it.
        With ``generation``: only to that agent (else ``AgentReplaced``, nothing sent).
        ``on_answer`` sees a successful answer on the reader's thread, before any frame
        that came after it is dispatched (a ``proc.start`` answer precedes its events)."""
        ident = next(self._ids)
        call = PendingCall(self, ident, op)
        with self._lock:
            if generation is not None and generation != self._generation:
                raise AgentReplaced(op)  # (before any wait: a new agent is never that one)
            if self._channel is None and self._restarting is not None:
                self._attached.wait_for(lambda: self._channel is not None or self._restarting is None, RESTART_WAIT)
            channel = self._channel
            if generation is not None and generation != self._generation:
                raise AgentReplaced(op)
            if channel is None:
                raise errors.InvalidState("the sandbox is not running (no agent connection)")
            call.generation = self._generation
            self._waiting[ident] = call.box
            if on_answer is not None:
                self._answer_hooks[ident] = on_answer
        try:
            channel.send_raw(codec.request(ident, op, args, payload))
        except ChannelClosed:
            call.forget()
            with self._lock:  # closed under us by a restart: the error names it, as for calls in flight
                restarted = self._restarted
            if restarted is not None and call.generation < restarted[0]:
                raise _Lost(restarted[1]).error(op) from None
            raise errors.SandboxError(f"the guest agent connection is closed ({op})") from None
        return call

    def _forget(self, ident: int) -> None:
        with self._lock:
            self._waiting.pop(ident, None)
            self._answer_hooks.pop(ident, None)

    def _dispatch(self, frame: Frame, generation: int) -> None:
        if frame.fds and not (frame.kind == "response" or (frame.kind == "event" and frame.header["event"] == "tcp.open"
                                                           and self.on_stream is not None)):
            discard_fds(frame)
            raise ProtocolError(f"a descriptor came with a {frame.kind} frame, which cannot carry one")
        if frame.kind == "event":
            if self.on_stream is not None and frame.header["event"] in codec.TCP_EVENTS:
                self.on_stream(frame)  # (owns a tcp.open's descriptor)
            else:
                self._on_event(frame, generation)
        elif frame.kind == "data":
            if self.on_stream is not None:
                self.on_stream(frame)
        elif frame.kind == "response":
            hook = None
            with self._lock:
                if frame.id is not None and frame.header.get("ok"):
                    hook = self._answer_hooks.pop(frame.id, None)
            if hook is not None:
                hook(frame, generation)
            with self._lock:  # (put under the lock: a caller giving up drains its box after removing it)
                box = self._waiting.get(frame.id) if frame.id is not None else None
                if box is not None:
                    box.put(frame)
            if box is None:
                discard_fds(frame)  # nobody waits for it (any more)

    def _read_loop(self, channel: FramedChannel, generation: int) -> None:
        reason = "the agent closed the channel"
        try:
            while True:
                frame = channel.recv()
                try:
                    self._dispatch(frame, generation)
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
            box.put(_Lost(None))
        if current:
            self._changed()
            self._on_lost(reason)


class PendingCall:
    """One agent request sent by ``AgentLink.submit``, its answer not yet taken."""

    def __init__(self, link: AgentLink, ident: int, op: str):
        self._link = link
        self.ident = ident
        self.op = op
        #: The generation of the channel it was sent on.
        self.generation = 0
        # (a SimpleQueue: one answer, one taker; a Queue costs three Conditions per call)
        self.box: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def wait(self, timeout: float | None = DEFAULT_AGENT_TIMEOUT) -> tuple[dict[str, Any], bytes]:
        """The answer's ``(result, payload)``, or its error raised as the mapped ``MvmError``."""
        frame = self.wait_frame(timeout)
        discard_fds(frame)  # nothing was asked for
        return dict(frame.header.get("result") or {}), frame.payload

    def wait_frame(self, timeout: float | None = DEFAULT_AGENT_TIMEOUT) -> Frame:
        """The successful answer frame (the caller owns its descriptors); an error answer raises."""
        try:
            try:
                item = self.box.get(timeout=timeout)
            except queue.Empty:
                raise errors.SandboxError(f"the guest agent did not answer {self.op} within {timeout} s") from None
        finally:
            self.forget()
        if isinstance(item, _Lost):
            raise item.error(self.op)
        frame: Frame = item
        if frame.header.get("ok"):
            return frame
        discard_fds(frame)
        raise errors.from_wire(frame.header.get("error") or {})

    def forget(self) -> None:
        """Stop waiting: the answer, when it comes, is dropped (its descriptors closed)."""
        self._link._forget(self.ident)
        while not self.box.empty():  # an answer that came after we gave up on it
            late = self.box.get_nowait()
            if isinstance(late, Frame):
                discard_fds(late)
