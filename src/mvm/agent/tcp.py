"""The ``tcp.*`` operations: guest-local TCP connections relayed over the host channel.

* ``tcp.connect`` (a port forward): the host picked an odd stream id and asks the
  agent to connect to a loopback port inside the guest; the connection's bytes
  then travel as stream frames (``mvm.protocol.tcpmux``).
* ``tcp.listen`` / ``tcp.unlisten`` (the egress proxy's guest end): a listener on
  the guest's loopback; each connection it accepts gets an even stream id and a
  ``tcp.open`` event, and the host serves it.

Streams belong to the link they were opened on: when the host reconnects (a new
hello, a new session) every stream of the old link is reset. Listeners stay.
There is no guest network interface involved: only loopback sockets.

*Handoff* (``handoff: true`` on either op; only on a link that ``passes_fds``: the
namespace backend's socketpair, the host is this kernel): instead of relaying a
connection as stream frames, the agent hands the connected socket itself to the
host (SCM_RIGHTS, with the ``tcp.connect`` answer or the ``tcp.open`` event) and
closes its own reference; the host relays it without the agent. The agent
never receives a descriptor from the host.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..protocol import codec
from ..protocol.channel import ChannelClosed
from ..protocol.codec import STREAM_WINDOW, Frame
from ..protocol.tcpmux import DEFAULT_MAX_STREAMS, StreamLimit, StreamMux, id_counter
from .errors import AgentError, Args, invalid

log = logging.getLogger("mvm.agent")

MAX_LISTENERS = 16
CONNECT_TIMEOUT = 10.0


class Tcp:
    """Streams and listeners of the agent; ``current_link`` returns the live link (or None)."""

    def __init__(self, current_link: Callable[[], Any]):
        self._current_link = current_link
        self.mux = StreamMux("mvm-tcp", window=STREAM_WINDOW, max_streams=DEFAULT_MAX_STREAMS)
        self._next_id = id_counter(2)  # guest-opened streams are even
        self._listeners: dict[int, socket.socket] = {}
        self._handoff: set[int] = set()  # listener ports whose connections are handed to the host
        self._lock = threading.Lock()

    # -- frames from the host ----------------------------------------------------------

    def feed(self, frame: Frame) -> None:
        """A ``data`` frame or an event from the host (called by the session's reader)."""
        if frame.kind == "data":
            if frame.header["stream"] == codec.TCP_STREAM:
                self.mux.feed(frame)
            else:
                log.info("ignoring data on stream %r from the host", frame.header["stream"])
        elif frame.header["event"] in ("tcp.window", "tcp.close"):
            self.mux.feed(frame)
        else:
            log.info("ignoring event %r from the host", frame.header["event"])

    def link_changed(self) -> None:
        """A new logical connection (or none): the old link's streams are gone."""
        dropped = self.mux.reset_all("the host reconnected")
        if dropped:
            log.info("reset %d stream(s) of the previous host connection", dropped)

    # -- operations ------------------------------------------------------------------------

    def connect(self, args: Args, link: Any) -> tuple[dict[str, Any], socket.socket | None]:
        """The answer, and the connected socket when it is handed to the host."""
        sid = args.integer("stream", minimum=1, maximum=(1 << 53), required=True)
        assert sid is not None
        if sid % 2 != 1:
            raise invalid("stream", f"{sid} is not a host stream id (host ids are odd)")
        port = args.integer("port", minimum=1, maximum=65535, required=True)
        host = _loopback(args.string("host", max_length=64) or "127.0.0.1")
        handoff = _handoff(args, link)
        if self.mux.has(sid):
            raise invalid("stream", f"stream {sid} is already open")
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except ConnectionRefusedError:
            raise AgentError("ConnectionRefused", f"nothing accepts connections on {host}:{port} in the sandbox",
                             port=port, errno="ECONNREFUSED") from None
        except TimeoutError:
            raise AgentError("ConnectionRefused", f"connecting to {host}:{port} timed out", port=port,
                             errno="ETIMEDOUT") from None
        except OSError as exc:
            raise AgentError("ConnectionRefused", f"cannot connect to {host}:{port}: {exc.strerror or exc}",
                             port=port) from None
        if handoff:
            sock.settimeout(None)  # the host relays it with blocking I/O (the flag is the socket's, shared)
            return {"stream": sid, "handoff": True}, sock
        try:
            self.mux.attach(sid, sock, _sender(link))
        except StreamLimit as exc:
            sock.close()
            raise AgentError("TooLarge", str(exc)) from None
        except ValueError as exc:
            sock.close()
            raise invalid("stream", str(exc)) from None
        return {"stream": sid, "window": STREAM_WINDOW}, None

    def listen(self, args: Args, link: Any) -> dict[str, Any]:
        port = args.integer("port", minimum=0, maximum=65535, required=True)
        assert port is not None
        host = _loopback(args.string("host", max_length=64) or "127.0.0.1")
        handoff = _handoff(args, link)
        with self._lock:
            if port and port in self._listeners:
                self._handoff.discard(port)  # as this (re)connected host asks
                if handoff:
                    self._handoff.add(port)
                return {"port": port, "existing": True}
            if len(self._listeners) >= MAX_LISTENERS:
                raise AgentError("TooLarge", f"at most {MAX_LISTENERS} listeners")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(128)
            except OSError as exc:
                sock.close()
                if exc.errno == 98:  # EADDRINUSE
                    raise AgentError("PortInUse", f"{host}:{port} is already in use in the sandbox",
                                     port=port, field="port") from None
                raise AgentError("InvalidArgument", f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                 field="port") from None
            actual = sock.getsockname()[1]
            self._listeners[actual] = sock
            if handoff:
                self._handoff.add(actual)
        self.mux.add_listener(sock, lambda conn, addr: self._accepted(actual, conn, addr))
        return {"port": actual, "existing": False}

    def unlisten(self, args: Args) -> dict[str, Any]:
        port = args.integer("port", minimum=1, maximum=65535, required=True)
        with self._lock:
            sock = self._listeners.pop(port, None)
            self._handoff.discard(port)
        if sock is not None:
            self.mux.remove_listener(sock)
        return {"closed": sock is not None}

    def _accepted(self, port: int, conn: socket.socket, addr: Any) -> None:
        link = self._current_link()
        if link is None or not link.alive:
            conn.close()  # nobody to serve it
            return
        sid = self._next_id()
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        if port in self._handoff and link.passes_fds:
            try:
                conn.setblocking(True)
                link.send(codec.event("tcp.open", stream=sid, port=port, peer=peer, fds=1), [conn.fileno()])
            finally:
                conn.close()  # the host's reference is the connection now (or none: the link is gone)
            return
        try:
            self.mux.attach(sid, conn, _sender(link),
                            first_frame=codec.event("tcp.open", stream=sid, port=port, peer=peer))
        except (StreamLimit, ValueError) as exc:
            log.warning("refusing a connection to %d: %s", port, exc)
            conn.close()


def _handoff(args: Args, link: Any) -> bool:
    handoff = args.boolean("handoff")
    if handoff and not link.passes_fds:
        raise invalid("handoff", "this connection to the host cannot pass sockets", allowed=[False])
    return handoff


def _sender(link: Any) -> Callable[[codec.Encoded], None]:
    def send(encoded: codec.Encoded) -> None:
        if not link.send(encoded):
            raise ChannelClosed("the host connection is gone")

    return send


def _loopback(host: str) -> str:
    """Only guest-local connections: a loopback address (or ``localhost``)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise invalid("host", f"{host!r} is not an IP address", allowed="a loopback address, e.g. 127.0.0.1") from None
    if not address.is_loopback:
        raise invalid("host", f"{host} is not a loopback address", allowed="127.0.0.0/8 or ::1")
    return str(address)
