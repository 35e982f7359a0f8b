"""Port forwards: a host listener whose connections are relayed to a guest loopback port.

``port.forward`` binds exactly the address asked for (a wildcard address only
with ``allow_wildcard``), and for each accepted connection asks the agent to
connect to ``127.0.0.1:<guest_port>`` inside the guest (``tcp.connect``). Where
the agent shares this kernel (namespace backend) it hands the connected socket
over and the supervisor relays the two sockets itself (``relay.py``: splice);
otherwise (a VM) the bytes flow as a stream of the supervisor's ``StreamMux``
over the agent channel. No guest network interface is involved, so forwards
work in ``mode="deny"``.

A forward lives until ``port.close``, the end of the sandbox, or -- when opened
with ``detach: false`` -- the end of the client connection that opened it
(``mvmctl port forward`` in the foreground).
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import errors
from ..protocol.tcpmux import Stream, StreamClosed, StreamLimit
from .relay import Relay, adopt, reset

if TYPE_CHECKING:
    from .network import NetworkManager
    from .session import RequestContext

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")
MAX_FORWARDS = 64
CONNECT_TIMEOUT = 30.0


class Forward:
    def __init__(self, fid: str, host: str, host_port: int, guest_port: int, sock: socket.socket, detached: bool):
        self.id = fid
        self.host = host
        self.host_port = host_port
        self.guest_port = guest_port
        self.sock = sock
        self.detached = detached
        self.created_at = time.time()
        self.active: set[int] = set()
        self.total = 0
        self.failed = 0
        self.bytes_in = 0  # host -> guest
        self.bytes_out = 0  # guest -> host
        self.closed = False
        self.audit_id: str | None = None
        self._last_failure_log = 0.0

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "host_port": self.host_port, "guest_port": self.guest_port,
                "detached": self.detached, "connections": len(self.active), "total_connections": self.total,
                "failed_connections": self.failed, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "created_at": self.created_at}

    def stream_done(self, stream: Stream) -> None:  # under the mux lock: bookkeeping only
        self.connection_done(stream.id, stream.sent, stream.received)

    def relay_done(self, relay: Relay) -> None:
        self.connection_done(relay.id, relay.bytes_in, relay.bytes_out)

    def connection_done(self, sid: int, bytes_in: int, bytes_out: int) -> None:
        self.active.discard(sid)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out


class PortForwards:
    def __init__(self, net: NetworkManager):
        self.net = net
        self._lock = threading.Lock()
        self._forwards: dict[str, Forward] = {}

    # ---- ops ----------------------------------------------------------------------------------

    def open(self, ctx: RequestContext) -> dict[str, Any]:
        args = ctx.args
        host = args.get("host", "127.0.0.1")
        if host is None:
            host = "127.0.0.1"
        if not isinstance(host, str):
            raise errors.InvalidArgument("host", f"{host!r} is not an address", allowed="e.g. '127.0.0.1'")
        host_port = _port(args.get("host_port", 0), "host_port", minimum=0)
        guest_port = _port(args.get("guest_port"), "guest_port", minimum=1)
        allow_wildcard = bool(args.get("allow_wildcard"))
        detached = args.get("detach", True) is not False
        address = _bind_address(host, allow_wildcard)
        with self._lock:
            if len(self._forwards) >= MAX_FORWARDS:
                raise errors.InvalidArgument("host_port", f"this sandbox already has {MAX_FORWARDS} forwards",
                                             allowed="close one first")
        sock = _listen(address, host_port, host)
        fwd = Forward("fwd_" + secrets.token_hex(6), address, sock.getsockname()[1], guest_port, sock, detached)
        with self._lock:
            self._forwards[fwd.id] = fwd
        self.net.mux.add_listener(sock, lambda conn, addr: self._accepted(fwd, conn))
        fwd.audit_id = self.net.sup.audit.record(
            "port.forward", {"host": address, "host_port": fwd.host_port, "guest_port": guest_port},
            details={"forward": fwd.id, "host": address, "host_port": fwd.host_port, "guest_port": guest_port,
                     "wildcard": address in WILDCARD_HOSTS, "detached": detached})
        self.net.sup.logs.write("network", "system", f"port forward {_hostport(address, fwd.host_port)} -> guest "
                                f"127.0.0.1:{guest_port} opened ({fwd.id})", fwd.audit_id, force=True)
        if not detached:
            threading.Thread(target=self._close_with_session, args=(fwd, ctx.session.closed), daemon=True,
                             name="mvm-fwd-session").start()
        return {**fwd.info(), "audit_id": fwd.audit_id}

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            forwards = list(self._forwards.values())
        return [fwd.info() for fwd in sorted(forwards, key=lambda f: f.created_at)]

    def close(self, ctx: RequestContext) -> dict[str, Any]:
        fwd = self._find(ctx.args)
        audit_id = self._close(fwd, "closed by request")
        return {"id": fwd.id, "closed": True, "audit_id": audit_id}

    def close_all(self, reason: str) -> None:
        with self._lock:
            forwards = list(self._forwards.values())
        for fwd in forwards:
            self._close(fwd, reason, audit=False)

    # ---- internals -------------------------------------------------------------------------------

    def _find(self, args: dict[str, Any]) -> Forward:
        ident = args.get("id")
        port = args.get("host_port")
        host = args.get("host")
        with self._lock:
            forwards = list(self._forwards.values())
        if isinstance(ident, str) and ident:
            matches = [f for f in forwards if f.id == ident]
        elif isinstance(port, int) and not isinstance(port, bool):
            matches = [f for f in forwards if f.host_port == port and (host is None or f.host == host)]
        else:
            raise errors.InvalidArgument("id", "name the forward by id or host_port")
        if len(matches) != 1:
            known = [f"{_hostport(f.host, f.host_port)} ({f.id})" for f in forwards]
            what = ident if isinstance(ident, str) and ident else port
            raise errors.InvalidArgument("port", f"no {'single ' if matches else ''}forward matches {what!r}",
                                         allowed=known or "no forwards are open")
        return matches[0]

    def _close(self, fwd: Forward, reason: str, *, audit: bool = True) -> str | None:
        with self._lock:
            if fwd.closed:
                return None
            fwd.closed = True
        self.net.mux.remove_listener(fwd.sock)  # not listening any more once it is off the list
        with self._lock:
            self._forwards.pop(fwd.id, None)
        for sid in list(fwd.active):
            self.net.abort_stream(sid, "the port forward was closed")
        audit_id = None
        if audit:
            audit_id = self.net.sup.audit.record("port.close", {"forward": fwd.id},
                                                 details={"forward": fwd.id, "reason": reason,
                                                          "connections": fwd.total})
        self.net.sup.logs.write("network", "system", f"port forward {_hostport(fwd.host, fwd.host_port)} -> guest "
                                f"127.0.0.1:{fwd.guest_port} closed ({reason}; {fwd.total} connections)", audit_id,
                                force=True)
        return audit_id

    def _close_with_session(self, fwd: Forward, session_closed: threading.Event) -> None:
        while not fwd.closed:
            if session_closed.wait(1.0):
                self._close(fwd, "its client disconnected")
                return

    def _accepted(self, fwd: Forward, conn: socket.socket) -> None:
        """On the mux's pump thread: register the stream, connect the guest side elsewhere."""
        sup = self.net.sup
        if fwd.closed or sup.state != "running" or not sup.agent.attached:
            reset(conn)
            return
        sid = self.net.next_id()
        if sup.agent.hands_off_sockets:
            if self.net.relays.count() >= self.net.relays.max_relays:
                reset(conn)
                return
            fwd.active.add(sid)
            fwd.total += 1
            threading.Thread(target=self._relay_guest, args=(fwd, sid, conn), name="mvm-fwd-connect",
                             daemon=True).start()
            return
        try:
            self.net.mux.attach(sid, conn, sup.agent.send, reading=False, on_done=fwd.stream_done, user=fwd)
        except (StreamLimit, ValueError):
            reset(conn)
            return
        fwd.active.add(sid)
        fwd.total += 1
        threading.Thread(target=self._connect_guest, args=(fwd, sid), name="mvm-fwd-connect", daemon=True).start()

    def _connect_guest(self, fwd: Forward, sid: int) -> None:
        """The agent-channel path: the guest side becomes stream ``sid`` of the mux."""
        try:
            self.net.sup.agent.call("tcp.connect", {"stream": sid, "port": fwd.guest_port, "host": "127.0.0.1"},
                                    timeout=CONNECT_TIMEOUT)
        except errors.MvmError as exc:
            self._guest_failed(fwd, exc)
            self.net.mux.abort(sid, f"the guest side failed: {exc.message}")
            return
        self.net.mux.start_reading(sid)

    def _relay_guest(self, fwd: Forward, sid: int, conn: socket.socket) -> None:
        """The handoff path: the agent connects and hands us the socket; we relay it to ``conn``."""
        try:
            _, fd = self.net.sup.agent.call_for_fd(
                "tcp.connect", {"stream": sid, "port": fwd.guest_port, "host": "127.0.0.1", "handoff": True},
                timeout=CONNECT_TIMEOUT)
            guest = adopt(fd, peer_port=fwd.guest_port)
        except errors.MvmError as exc:
            self._guest_failed(fwd, exc)
            fwd.connection_done(sid, 0, 0)
            reset(conn)
            return
        try:
            self.net.relays.start(sid, conn, guest, on_done=fwd.relay_done)
        except StreamClosed:  # (both sockets were reset)
            fwd.connection_done(sid, 0, 0)
            return
        if fwd.closed:  # closed while we connected: its abort did not find this one yet
            self.net.relays.abort(sid, "the port forward was closed")

    def _guest_failed(self, fwd: Forward, exc: errors.MvmError) -> None:
        fwd.failed += 1
        now = time.monotonic()
        if now - fwd._last_failure_log > 5:  # a client retrying in a loop must not flood the log
            fwd._last_failure_log = now
            self.net.sup.logs.write("network", "system", f"port forward {fwd.id}: connection to guest "
                                    f"127.0.0.1:{fwd.guest_port} failed: {exc.message}", force=True)


def _port(value: Any, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 65535:
        raise errors.InvalidArgument(field, f"{value!r} is not a port number", allowed=f"{minimum}..65535")
    return value


def _bind_address(host: str, allow_wildcard: bool) -> str:
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in WILDCARD_HOSTS:
        if not allow_wildcard:
            raise errors.InvalidArgument(
                "host", f"{host or '(empty)'!r} would listen on every interface of the host; pass "
                "allow_wildcard: true (mvmctl: --allow-wildcard) if that is what you want",
                allowed="a specific address such as '127.0.0.1'")
        return "::" if host == "::" else "0.0.0.0"
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise errors.InvalidArgument("host", f"{host!r} is not an IP address",
                                     allowed="an address of this host, e.g. '127.0.0.1'") from None
    if address.is_unspecified:
        raise errors.InvalidArgument("host", f"{host} is a wildcard address; pass allow_wildcard: true",
                                     allowed="a specific address such as '127.0.0.1'")
    return str(address)


def _listen(address: str, port: int, asked: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        where = _hostport(address, port)
        if exc.errno == errno.EADDRINUSE:
            raise errors.PortInUse("host_port", f"{where} is already in use on the host",
                            allowed="a free port, or 0 to pick one") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise errors.InvalidArgument("host", f"{asked!r} is not an address of this host") from None
        if exc.errno == errno.EACCES:
            raise errors.InvalidArgument("host_port", f"binding {where} needs privileges",
                                         allowed="a port >= 1024") from None
        raise errors.InvalidArgument("host", f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
