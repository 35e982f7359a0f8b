"""Connections, hello, and request dispatch.

One reader thread (the caller of ``Server.serve``) reads frames from the host
and hands requests to a small worker pool, so a slow file operation never holds
up another request, and process events (sent by the output pump) never wait for
either. Requests that must stay in order -- the chunks of one write handle, the
stdin of one process -- run in a *lane*: one at a time, in arrival order.

A *link* is one logical host connection: it starts with the agent's hello and
ends when the transport session ends or the host says hello again (it
reconnected without the agent noticing). Answers to requests of an old link are
dropped; events always go to the current link (waiting for one if there is
none). Per-connection state -- open write handles -- is dropped with the link;
processes keep running.

Every request gets exactly one response: its result, an ``UnknownOp``, the
``AgentError`` its handler raised, or ``Internal`` for a bug -- never a crash.
A ``ProtocolError`` from the host ends the session.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..protocol import codec
from ..protocol.channel import ChannelClosed
from ..protocol.codec import Encoded, Frame, ProtocolError
from . import AGENT_VERSION
from .errors import AgentError, Args, from_os_error
from .files import Files
from .processes import ProcessManager
from .system import System
from .tcp import Tcp

log = logging.getLogger("mvm.agent")

#: Requests being handled (or waiting for a worker) before the reader stops reading.
MAX_IN_FLIGHT = 32
#: Payload bytes of those requests before the reader stops reading.
MAX_IN_FLIGHT_BYTES = 16 * 1024 * 1024
WORKERS = 8


class Session(Protocol):
    #: Can a frame carry a descriptor to the host (``send_raw(..., fds)``)?
    passes_fds: bool

    def send_raw(self, encoded: Encoded, fds: Sequence[int] = ()) -> None: ...
    def recv(self) -> Frame: ...
    def close(self, *, broken: bool = False) -> None: ...


class Connector(Protocol):
    reconnects: bool

    def connect(self) -> Session | None: ...
    def finished(self, session: Any) -> None: ...


@dataclass
class Reply:
    """A handler's answer; ``after_send`` runs once the response is on its way. ``handoff``
    (a connected socket) goes to the host with the response and is closed here after it."""

    result: dict[str, Any]
    payload: bytes = b""
    after_send: Callable[[], None] | None = None
    handoff: socket.socket | None = None


#: Returned by a handler that will answer later through ``Request.respond``.
DEFERRED = object()


class Link:
    """One logical host connection (see the module docstring)."""

    def __init__(self, session: Session, send_lock: threading.Lock):
        self.session = session
        self.alive = True
        self._send_lock = send_lock

    @property
    def passes_fds(self) -> bool:
        return self.session.passes_fds

    def send(self, encoded: Encoded, fds: Sequence[int] = ()) -> bool:
        """Send one frame (with ``fds`` if its header announces them); False if this link
        is gone (the frame is dropped)."""
        with self._send_lock:
            if not self.alive:
                return False
            try:
                self.session.send_raw(encoded, fds)
                return True
            except ChannelClosed:
                self.alive = False
                return False


class Request:
    """One request from the host, answered exactly once on the link it came from."""

    def __init__(self, link: Link, frame: Frame):
        self.link = link
        self.id: int = frame.header["id"]
        self.op: str = frame.header["op"]
        self.args = Args(frame.header.get("args"))
        self.payload = frame.payload

    def respond(self, reply: Reply) -> None:
        if reply.handoff is not None:
            try:
                self.link.send(codec.response_ok(self.id, reply.result, fds=1), [reply.handoff.fileno()])
            finally:
                reply.handoff.close()  # the host has its own reference now (or none: the link is gone)
            return
        try:
            encoded = codec.response_ok(self.id, reply.result, reply.payload)
        except ProtocolError as exc:
            encoded = codec.response_error(self.id, "TooLarge", f"the answer to {self.op} does not fit a frame: {exc}")
        self.link.send(encoded)

    def fail(self, error: AgentError) -> None:
        try:
            encoded = codec.response_error(self.id, error.type, error.message, **error.details)
        except ProtocolError:
            encoded = codec.response_error(self.id, error.type, f"{self.op} failed (the details were not encodable)")
        self.link.send(encoded)


class Admission:
    """Bounds what the reader takes in before workers catch up (count and payload bytes)."""

    def __init__(self, max_requests: int = MAX_IN_FLIGHT, max_bytes: int = MAX_IN_FLIGHT_BYTES):
        self._cond = threading.Condition()
        self._count = 0
        self._bytes = 0
        self._max_requests = max_requests
        self._max_bytes = max_bytes

    def enter(self, size: int) -> None:
        with self._cond:
            while self._count and (self._count >= self._max_requests or self._bytes + size > self._max_bytes):
                self._cond.wait()
            self._count += 1
            self._bytes += size

    def leave(self, size: int) -> None:
        with self._cond:
            self._count -= 1
            self._bytes -= size
            self._cond.notify_all()


class WorkerPool:
    """A few daemon threads; jobs with the same lane key run one at a time, in order."""

    def __init__(self, workers: int = WORKERS):
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lanes: dict[Hashable, deque[Callable[[], None]]] = {}
        self._lock = threading.Lock()
        for number in range(workers):
            threading.Thread(target=self._work, name=f"mvm-worker-{number}", daemon=True).start()

    def submit(self, job: Callable[[], None], lane: Hashable | None = None) -> None:
        if lane is None:
            self._jobs.put(job)
            return
        with self._lock:
            waiting = self._lanes.get(lane)
            if waiting is not None:
                waiting.append(job)
                return
            self._lanes[lane] = deque()
        self._jobs.put(self._in_lane(job, lane))

    def _in_lane(self, job: Callable[[], None], lane: Hashable) -> Callable[[], None]:
        def run() -> None:
            try:
                job()
            finally:
                with self._lock:
                    waiting = self._lanes[lane]
                    if waiting:
                        self._jobs.put(self._in_lane(waiting.popleft(), lane))
                    else:
                        del self._lanes[lane]

        return run

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:
                log.exception("worker job failed")


class Server:
    """The agent: serves each session its connector hands out."""

    def __init__(self, connector: Connector, *, workers: int = WORKERS):
        self.connector = connector
        self.system = System()
        self.files = Files(self.system.default_user)
        self.processes = ProcessManager(self.system.base_env, self.emit_event, self.system.default_cwd,
                                        self.system.default_user)
        self._send_lock = threading.Lock()
        self._link: Link | None = None
        self._link_changed = threading.Condition()
        self._stopping = False
        self._pool = WorkerPool(workers)
        self._admission = Admission()
        self.tcp = Tcp(lambda: self._link)
        self._ops: dict[str, Callable[[Request], Any]] = {
            "ping": lambda request: {},
            "agent.info": self._agent_info,
            "agent.configure": lambda request: self.system.configure(request.args),
            "proc.start": self._proc_start,
            "proc.stdin": self._proc_stdin,
            "proc.signal": lambda request: self.processes.signal(request.args),
            "proc.list": lambda request: self.processes.list(),
            "fs.read": lambda request: Reply(*self.files.read(request.args)),  # type: ignore[arg-type]  # sent before the buffer is reused
            "fs.read_close": lambda request: self.files.read_close(request.args),
            "fs.write": lambda request: self.files.write(request.args, request.payload),
            "fs.write_begin": lambda request: self.files.write_begin(request.args),
            "fs.write_chunk": lambda request: self.files.write_chunk(request.args, request.payload),
            "fs.write_end": lambda request: self.files.write_end(request.args),
            "fs.list": lambda request: self.files.list(request.args),
            "fs.stat": lambda request: self.files.stat(request.args),
            "fs.mkdir": lambda request: self.files.mkdir(request.args),
            "fs.remove": lambda request: self.files.remove(request.args),
            "fs.move": lambda request: self.files.move(request.args),
            "fs.sync": lambda request: self.files.sync(),
            "tcp.connect": self._tcp_connect,
            "tcp.listen": lambda request: self.tcp.listen(request.args, request.link),
            "tcp.unlisten": lambda request: self.tcp.unlisten(request.args),
        }

    # -- the connection loop ------------------------------------------------------

    def serve(self) -> int:
        """Serve sessions until the connector has no more; then kill what we started."""
        self.processes.start_threads()
        try:
            while True:
                session = self.connector.connect()
                if session is None:
                    break
                broken = False
                try:
                    self._serve_session(session)
                except ChannelClosed as exc:
                    log.info("host connection ended: %s", exc)
                except ProtocolError as exc:
                    log.warning("closing the host connection after a protocol error: %s", exc)
                    broken = True
                except OSError as exc:
                    log.warning("host connection failed: %s", exc)
                finally:
                    self._retire(session)
                    session.close(broken=broken)
                self.connector.finished(session)
                if not self.connector.reconnects:
                    break
        finally:
            with self._link_changed:
                self._stopping = True
                self._link_changed.notify_all()
            self.processes.kill_everything()
        return 0

    def _serve_session(self, session: Session) -> None:
        link = self._open_link(session)
        greeted = False
        while True:
            frame = session.recv()
            kind = frame.kind
            if kind == "hello":
                codec.check_hello(frame)
                if greeted:  # the host reconnected: answer, and forget the old connection's state
                    link = self._open_link(session)
                greeted = True
            elif not greeted:
                raise ProtocolError(f"the host's first frame must be hello, got {kind}")
            elif kind == "request":
                self._dispatch(link, frame)
            elif kind == "event" and frame.header["event"] == "proc.window":  # output credit (never blocks)
                self.processes.pump.grant(frame.header["pid"], frame.header["bytes"])
            elif kind in ("data", "event"):  # TCP stream bytes and credit (never blocks)
                self.tcp.feed(frame)
            elif kind != "cancel":  # agent operations are short: a cancel just gets the normal answer
                log.info("ignoring a %s frame from the host", kind)

    def _hello(self, session: Session) -> bytes:
        # fd_passing: this connection can hand connected sockets to the host (tcp.* "handoff")
        return codec.hello("agent", agent_version=AGENT_VERSION, python=platform.python_version(), pid=os.getpid(),
                           fd_passing=session.passes_fds)

    def _open_link(self, session: Session) -> Link:
        """Start a logical connection: drop the old one's state, send our hello first."""
        self.files.discard_handles()
        self.tcp.link_changed()
        self.processes.pump.new_link()
        with self._send_lock:
            if self._link is not None:
                self._link.alive = False
            link = Link(session, self._send_lock)
            session.send_raw(self._hello(session))
        with self._link_changed:
            self._link = link
            self._link_changed.notify_all()
        return link

    def _retire(self, session: Session) -> None:
        with self._link_changed:
            if self._link is not None and self._link.session is session:
                self._link.alive = False
                self._link = None
        self.files.discard_handles()
        self.tcp.link_changed()

    def emit_event(self, encoded: bytes) -> None:
        """Send an event on the current link; wait for one while there is none."""
        while True:
            with self._link_changed:
                while (self._link is None or not self._link.alive) and not self._stopping:
                    self._link_changed.wait()
                link = self._link
                if link is None or not link.alive:
                    return  # stopping: nobody left to tell
            if link.send(encoded):
                return

    # -- requests ----------------------------------------------------------------

    def _dispatch(self, link: Link, frame: Frame) -> None:
        size = len(frame.payload)
        self._admission.enter(size)
        request = Request(link, frame)

        def job() -> None:
            try:
                self._handle(request)
            finally:
                self._admission.leave(size)

        self._pool.submit(job, self._lane_of(request))

    @staticmethod
    def _lane_of(request: Request) -> Hashable | None:
        if request.op in ("fs.write_chunk", "fs.write_end"):
            handle = request.args.raw.get("handle")
            return ("write", handle) if isinstance(handle, int) else None
        if request.op == "proc.stdin":
            pid = request.args.raw.get("pid")
            return ("stdin", pid) if isinstance(pid, int) else None
        return None

    def _handle(self, request: Request) -> None:
        handler = self._ops.get(request.op)
        try:
            if handler is None:
                raise AgentError("UnknownOp", f"unknown op {request.op!r}", allowed=sorted(self._ops))
            outcome = handler(request)
        except AgentError as exc:
            request.fail(exc)
            return
        except OSError as exc:
            request.fail(from_os_error(exc))
            return
        except Exception as exc:
            log.exception("%s failed", request.op)
            request.fail(AgentError("Internal", f"{request.op} failed: {type(exc).__name__}: {exc}"))
            return
        if outcome is DEFERRED:
            return
        reply = outcome if isinstance(outcome, Reply) else Reply(outcome)
        try:
            request.respond(reply)
        finally:
            if reply.after_send is not None:
                reply.after_send()

    # -- handlers that need the server -----------------------------------------------

    def _agent_info(self, request: Request) -> dict[str, Any]:
        return {**self.system.info(), "ops": sorted(self._ops)}

    def _tcp_connect(self, request: Request) -> Reply:
        result, handoff = self.tcp.connect(request.args, request.link)
        return Reply(result, handoff=handoff)

    def _proc_start(self, request: Request) -> Reply:
        result, start_pumping = self.processes.start(request.args)
        return Reply(result, after_send=start_pumping)

    def _proc_stdin(self, request: Request) -> object:
        self.processes.stdin(request.args, request.payload, lambda result: request.respond(Reply(result)))
        return DEFERRED
