"""Client connections to the supervisor: one ``ClientSession`` per connection (a reader
thread, a thread per request) and the ``RequestContext`` of each request being served."""

from __future__ import annotations

import functools
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import errors
from ..agent.errors import AgentError, Args
from ..protocol import CHUNK_SIZE, codec
from ..protocol.channel import ChannelClosed, FramedChannel
from ..protocol.codec import Frame, ProtocolError
from .audit import set_actor

if TYPE_CHECKING:
    from .server import Supervisor

#: What an operation's handler returns: the response's result and its payload.
Reply = tuple[dict[str, Any], bytes]
#: Client connections served at once, and requests in flight on each: every one costs a
#: thread, and a client that never reads nor stops asking must not exhaust the supervisor's.
MAX_SESSIONS = 128
MAX_INFLIGHT = 64
_sessions = threading.BoundedSemaphore(MAX_SESSIONS)


class RequestThreads:
    """The threads requests are served on, kept for the next request once one is answered:
    a request goes to an idle thread if there is one, else to a new thread (so requests
    never wait for each other). Starting a thread per request cost a ``clone`` and a
    handshake with the new thread on every call; a thread idle for ``IDLE_SECONDS`` ends."""

    IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a job, less the jobs queued for them

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on a thread of its own; ``RuntimeError`` if no thread can be started."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._serve, args=(job,), daemon=True, name="mvm-request").start()

    def _serve(self, job: Callable[[], None]) -> None:
        while True:
            try:
                job()
            except BaseException:  # a job answers its own errors; a bug must not end the thread silently
                traceback.print_exc()
            with self._lock:
                self._idle += 1
            while True:
                try:
                    job = self._jobs.get(timeout=self.IDLE_SECONDS)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._idle > 0:  # more idle threads than queued jobs: this one may go
                            self._idle -= 1
                            return
                    # a job was queued for this thread just now: take it


_request_threads = RequestThreads()


class RequestContext:
    """One client request being served: its id, its connection, and whether it was cancelled."""

    def __init__(self, session: ClientSession, frame: Frame):
        self.session = session
        self.id = frame.header["id"]
        self.op = frame.header["op"]
        self.args: dict[str, Any] = frame.header.get("args") or {}
        self.payload = frame.payload
        self.cancelled = threading.Event()
        #: Set by what ends a wait of this request's handler: its cancel (or its connection's
        #: end), and whatever the handler asked to be woken by (a process's exit, its output).
        self.wake = threading.Event()
        #: Data bytes the client still takes (its ``window``, then its ``data.window`` grants);
        #: None: a client that does not flow-control its requests (sends just block on its socket).
        self.window: int | None = frame.header.get("window")
        self.credit = self.window
        self._credit_changed = threading.Condition()
        #: A monotonic time past which ``send_data`` stops waiting for credit (``exec.run``'s timeout).
        self.deadline: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        self.wake.set()
        with self._credit_changed:
            self._credit_changed.notify_all()

    def grant(self, size: int) -> None:
        """The client's ``data.window``: ``size`` more bytes may be sent (the session's reader)."""
        with self._credit_changed:
            if self.credit is None:
                return  # not flow-controlled: nothing waits for it
            self.credit = min(self.credit + size, codec.MAX_GRANT)
            self._credit_changed.notify_all()

    def stopping(self) -> bool:
        """Cancelled, its connection gone, or past its ``deadline``: no more data to send."""
        return (self.cancelled.is_set() or self.session.closed.is_set()
                or (self.deadline is not None and time.monotonic() >= self.deadline))

    @property
    def arg(self) -> Args:
        """Typed reading of ``args`` (the agent's checks: one definition of each); a wrong
        value raises an ``InvalidArgument`` naming its field."""
        return Args(self.args)

    def send_data(self, stream: str, payload: bytes, *, whole: bool = False) -> bool:
        """Send ``payload`` as ``data`` frames, never beyond the client's credit: waits for its
        grants (the client reads at its own pace; the bytes not sent yet stay with the
        caller). ``whole``: one frame, sent once the credit covers it all (a log entry).
        ``False`` when it stopped unsent (``stopping``)."""
        view = memoryview(payload)  # slices of it are sent as they are, never copied
        while True:
            size = min(len(view), CHUNK_SIZE) if not whole else len(view)
            if self.credit is not None:
                with self._credit_changed:
                    # (a whole frame larger than the client's whole window waits for all of it)
                    need = min(size, self.window or size) if whole else 1
                    while self.credit < need and not self.stopping():
                        remaining = None if self.deadline is None else self.deadline - time.monotonic()
                        self._credit_changed.wait(remaining)
                    if self.stopping():
                        return False
                    if not whole:
                        size = min(size, self.credit)
                    self.credit -= size
            self.session.send(codec.data_parts(self.id, stream, view[:size]))  # type: ignore[arg-type]
            view = view[size:]
            if not view:
                return True


class ClientSession:
    """One client connection: a reader thread, a thread per request."""

    def __init__(self, supervisor: Supervisor, sock: socket.socket):
        self.supervisor = supervisor
        self.channel = FramedChannel(sock)
        self.actor = peer_actor(sock)
        self.inflight: dict[int, RequestContext] = {}
        self.closed = threading.Event()

    def send(self, encoded: codec.Encoded) -> None:
        try:
            self.channel.send_raw(encoded)
        except ChannelClosed:
            self.closed.set()

    @classmethod
    def accept(cls, supervisor: Supervisor, sock: socket.socket) -> None:
        """Serve a new connection on a thread of its own, or close it at once when
        ``MAX_SESSIONS`` are served already (the client sees the handshake fail)."""
        if not _sessions.acquire(blocking=False):
            sock.close()
            return
        try:
            threading.Thread(target=cls(supervisor, sock).serve, daemon=True, name="mvm-client").start()
        except BaseException:
            _sessions.release()
            sock.close()
            raise

    def serve(self) -> None:
        try:
            peer = self.channel.handshake("supervisor", sandbox_id=self.supervisor.sandbox_id)
            self.actor = with_principal(self.actor, peer.get("on_behalf_of"))
            while True:
                frame = self.channel.recv()
                if frame.kind == "request":
                    ctx = RequestContext(self, frame)
                    if ctx.id in self.inflight:
                        self.send(codec.response_error(ctx.id, "InvalidArgument", f"id: request {ctx.id} is "
                                                       "still in flight on this connection", field="id"))
                        continue
                    if len(self.inflight) >= MAX_INFLIGHT:
                        self.send(codec.response_error(
                            ctx.id, "TooLarge", f"{ctx.op}: {MAX_INFLIGHT} requests are in flight on this "
                            "connection already; retry when some have been answered", limit=MAX_INFLIGHT))
                        continue
                    self.inflight[ctx.id] = ctx
                    try:
                        _request_threads.submit(functools.partial(self._run, ctx))
                    except RuntimeError:  # no thread to be had: answer, do not fall over
                        self.inflight.pop(ctx.id, None)
                        self.send(codec.response_error(ctx.id, "TooLarge", f"{ctx.op}: the supervisor cannot "
                                                       "start another thread now; retry later"))
                elif frame.kind == "cancel":
                    ctx_or_none = self.inflight.get(frame.header["id"])
                    if ctx_or_none is not None:
                        ctx_or_none.cancel()
                elif frame.kind == "event" and frame.header["event"] == "data.window":
                    ctx_or_none = self.inflight.get(frame.header["id"])
                    if ctx_or_none is not None:  # (a grant may cross the request's answer)
                        ctx_or_none.grant(frame.header["bytes"])
        except (ChannelClosed, ProtocolError, OSError):
            pass
        finally:
            self.closed.set()
            for ctx in list(self.inflight.values()):
                ctx.cancel()
            self.channel.close()
            _sessions.release()

    def _run(self, ctx: RequestContext) -> None:
        set_actor(self.actor)
        try:
            answer = self._answer(ctx)
        finally:
            # Leave the in-flight set before answering: a client that sends its next request
            # the moment it reads this answer must find a free slot (MAX_INFLIGHT).
            self.inflight.pop(ctx.id, None)
        self.send(answer)
        if ctx.op == "sandbox.destroy":
            self.supervisor.exit_after_destroy()

    def _answer(self, ctx: RequestContext) -> codec.Encoded:
        try:
            result, payload = self.supervisor.handle(ctx)
            return codec.response_ok(ctx.id, result, payload)
        except errors.MvmError as exc:
            return codec.encode({"kind": "response", "id": ctx.id, "ok": False, "error": exc.to_wire()})
        except AgentError as exc:  # an argument ``ctx.arg`` refused: the same wire error the agent gives
            return codec.response_error(ctx.id, exc.type, exc.message, **exc.details)
        except Exception as exc:  # a bug: answer, log, keep serving
            traceback.print_exc()
            return codec.response_error(ctx.id, "Internal", f"{type(exc).__name__}: {exc}")


def with_principal(actor: dict[str, Any] | None, claimed: Any) -> dict[str, Any] | None:
    """Add who a host client acts for (``on_behalf_of`` in its hello: e.g. ``mvmctl mcp``
    names its MCP client) to the actor its socket credentials prove. It is recorded as the
    client's claim next to those credentials, never instead of them; bounded in size."""
    if not isinstance(claimed, dict) or not claimed:
        return actor
    principal = {str(k)[:64]: str(v)[:256] for k, v in list(claimed.items())[:8]}
    return {**(actor or {}), "on_behalf_of": principal}


def peer_actor(sock: socket.socket) -> dict[str, Any] | None:
    """Who is on the other end of a client connection (pid, uid, user), from SO_PEERCRED."""
    import struct

    from ..security.audit import actor_for

    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", creds)
    return dict(actor_for(pid, uid))
