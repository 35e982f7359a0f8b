"""The host side of allow-listed egress: the policy check and the HTTP proxy.

In ``mode="allow"`` the guest has no network interface; its processes get
``HTTP(S)_PROXY=http://127.0.0.1:3128``, a listener of the agent's, and every
connection to it is announced over the agent channel (``tcp.open``) to
``EgressProxy`` here -- as a stream of the channel, or (namespace backend) with
the accepted socket itself handed over, which the supervisor then relays to the
destination without the agent (``relay.py``). The proxy speaks HTTP ``CONNECT``
and plain HTTP proxying:

* the destination must match an allow-list entry (``host:port``; ``*`` patterns
  and CIDR blocks only when the policy has ``allow_wildcards``);
* names are resolved on the host, and the proxy connects to the address it
  checked (no second lookup);
* an address that is not globally routable (private, loopback, link-local and
  cloud metadata, CGNAT, ULA, multicast, reserved) is refused unless an entry
  names that address (or a CIDR block holding it) explicitly -- a listed *name*
  that resolves to one is refused too (DNS rebinding);
* ``host.mvm.internal`` is the host's own ``127.0.0.1``: allowed only for ports an
  entry ``host.mvm.internal:PORT`` names (no wildcard covers it); a loopback address
  asked of the proxy is refused with that hint (the guest's 127.0.0.1 is the guest);
* every allowed and refused destination goes into the sandbox's log (source
  ``network``) and its audit chain (op ``network.egress``).

A refused request gets ``403`` with ``X-Mvm-Egress: refused``; an unreachable
allowed destination ``502``. Plain-HTTP requests are sent upstream with
``Connection: close`` so one connection carries one checked request.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..backends.base import HOST_ALIAS, HOST_ALIAS_ADDRESS
from ..protocol.tcpmux import PendingStream, StreamClosed, StreamLimit
from .relay import GuestConnection, reset

if TYPE_CHECKING:
    from .network import NetworkManager

#: The guest-local listener (agent side) and the environment pointing every guest process at it.
EGRESS_GUEST_PORT = 3128
PROXY_URL = f"http://127.0.0.1:{EGRESS_GUEST_PORT}"
PROXY_ENV = {
    "HTTP_PROXY": PROXY_URL, "HTTPS_PROXY": PROXY_URL, "http_proxy": PROXY_URL, "https_proxy": PROXY_URL,
    "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1",
}
HEAD_LIMIT = 64 * 1024
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0
#: Guest connections whose request head is still being read (more are refused at once).
MAX_HANDSHAKES = 128
#: Log/audit records per window before further ones are only counted (a guest cannot flood the audit chain).
RECORD_BURST = 100
RECORD_WINDOW = 10.0

_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
_REASONS = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large", 502: "Bad Gateway"}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te",
               "upgrade"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_sensitive(address: IPAddress) -> bool:
    """Anything but a globally routable unicast address (private, loopback, link-local --
    169.254.169.254 among them --, CGNAT, ULA, reserved, documentation ranges, multicast)."""
    address = _unmapped(address)
    return not address.is_global or address.is_multicast


@dataclass(frozen=True)
class Rule:
    text: str
    port: int
    kind: str  # "name" | "pattern" | "any" | "ip" | "net"
    value: Any


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    addresses: tuple[str, ...] = ()
    rule: str | None = None


@dataclass
class EgressPolicy:
    """The policy of ``mvm.network(...)`` compiled for the proxy (validated by the SDK first)."""

    mode: str = "deny"
    allow: tuple[str, ...] = ()
    allow_wildcards: bool = False
    rules: list[Rule] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EgressPolicy:
        mode = str(config.get("mode") or "deny")
        allow = tuple(str(entry) for entry in config.get("allow") or ())
        return cls(mode=mode, allow=allow, allow_wildcards=bool(config.get("allow_wildcards")),
                   rules=[_compile(entry) for entry in allow])

    def to_wire(self) -> dict[str, Any]:
        return {"mode": self.mode, "allow": list(self.allow), "allow_wildcards": self.allow_wildcards}

    def decide(self, host: str, port: int, resolve: Callable[[str, int], list[str]] | None = None) -> Decision:
        """May the guest reach ``host:port``? Resolves allowed names (on the host)."""
        if self.mode != "allow":
            return Decision(False, f"network mode is {self.mode}")
        rules = [rule for rule in self.rules if rule.port == port]
        host = host.lower().rstrip(".")
        hint = f"allow '{HOST_ALIAS}:{port}' and connect to {HOST_ALIAS}:{port} to reach the host's 127.0.0.1:{port}"
        if host == HOST_ALIAS:  # only its own entries, never a wildcard
            alias = next((r for r in rules if r.kind == "name" and r.value == HOST_ALIAS), None)
            if alias is None:
                return Decision(False, f"not in the allow-list ({hint})")
            return Decision(True, "the host's loopback, listed explicitly", (HOST_ALIAS_ADDRESS,), alias.text)
        try:
            literal: IPAddress | None = _unmapped(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            literal = None
        if host == "localhost" or (literal is not None and literal.is_loopback):
            return Decision(False, f"{host} is the sandbox's own loopback; {hint}")
        if not rules:
            return Decision(False, "not in the allow-list")
        if literal is not None:
            explicit = _explicit_rule(rules, literal)
            if explicit is not None:
                return Decision(True, "listed explicitly", (str(literal),), explicit.text)
            broad = next((r for r in rules if r.kind == "any"), None)
            if broad is None:
                return Decision(False, "not in the allow-list")
            if is_sensitive(literal):
                return Decision(False, f"{literal} is not a public address (private, loopback, link-local or "
                                       "metadata ranges must be listed explicitly)")
            return Decision(True, "wildcard entry", (str(literal),), broad.text)
        rule = next((r for r in rules if _name_matches(r, host)), None)
        if rule is None:
            return Decision(False, "not in the allow-list")
        try:
            addresses = (resolve or resolve_host)(host, port)
        except OSError as exc:
            return Decision(False, f"cannot resolve {host}: {exc}")
        usable = []
        for text in addresses:
            address = _unmapped(ipaddress.ip_address(text.split("%")[0]))
            if not address.is_loopback and (not is_sensitive(address) or _explicit_rule(rules, address) is not None):
                usable.append(str(address))
        if not usable:
            how = hint if all(_unmapped(ipaddress.ip_address(a.split("%")[0])).is_loopback for a in addresses) \
                else "list the address explicitly to allow it"
            return Decision(False, f"{host} resolves only to non-public addresses ({', '.join(addresses[:4])}); {how}")
        return Decision(True, "allow-list entry", tuple(dict.fromkeys(usable)), rule.text)


def _compile(entry: str) -> Rule:
    host, _, port_text = entry.rpartition(":")
    host = host.strip("[]").lower().rstrip(".")
    port = int(port_text)
    if host in ("*", "0.0.0.0", "::"):
        return Rule(entry, port, "any", None)
    if "/" in host:
        return Rule(entry, port, "net", ipaddress.ip_network(host, strict=False))
    try:
        return Rule(entry, port, "ip", _unmapped(ipaddress.ip_address(host)))
    except ValueError:
        pass
    if "*" in host:
        return Rule(entry, port, "pattern", host)
    return Rule(entry, port, "name", host)


def _explicit_rule(rules: list[Rule], address: IPAddress) -> Rule | None:
    for rule in rules:
        if rule.kind == "ip" and rule.value == address:
            return rule
        if rule.kind == "net" and rule.value.prefixlen > 0 and address.version == rule.value.version \
                and address in rule.value:
            return rule
    return None


def _name_matches(rule: Rule, host: str) -> bool:
    if rule.kind == "name":
        return bool(rule.value == host)
    if rule.kind == "pattern":
        return fnmatch.fnmatchcase(host, rule.value)
    return rule.kind == "any"


def resolve_host(host: str, port: int) -> list[str]:
    """The host's view of ``host`` (getaddrinfo), bounded in time."""
    result: dict[str, Any] = {}

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result["addresses"] = list(dict.fromkeys(str(info[4][0]) for info in infos))
        except OSError as exc:
            result["error"] = exc

    worker = threading.Thread(target=lookup, name="mvm-resolve", daemon=True)
    worker.start()
    worker.join(RESOLVE_TIMEOUT)
    if "addresses" in result:
        addresses: list[str] = result["addresses"]
        return addresses
    if "error" in result:
        raise result["error"]
    raise TimeoutError(f"resolving {host} took longer than {RESOLVE_TIMEOUT:.0f} s")


# ---- HTTP -----------------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ProxyRequest:
    method: str
    host: str
    port: int
    version: str
    path: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def upstream_head(self) -> bytes:
        """The request as the origin server should see it (origin-form, one request per connection)."""
        lines = [f"{self.method} {self.path} {self.version}"]
        has_host = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP:
                continue
            has_host = has_host or lowered == "host"
            lines.append(f"{name}: {value}")
        if not has_host:
            lines.append(f"Host: {self.destination if self.port != 80 else self.host}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_request(head: bytes) -> ProxyRequest:
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha():
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(400, f"unsupported protocol version {version[:20]!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise BadRequest(400, "malformed header line")
        headers.append((name, value.strip()))
    if method == "CONNECT":
        host, port = _authority(target)
        return ProxyRequest(method, host, port, version, headers=headers)
    try:
        url = urlsplit(target)
        port = url.port or 80
    except ValueError:
        raise BadRequest(400, "malformed URL") from None
    if url.scheme != "http" or not url.hostname:
        raise BadRequest(400, "only absolute http:// URLs are proxied; use CONNECT for https")
    host = _check_host(url.hostname)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    return ProxyRequest(method, host, port, version, path=path, headers=headers)


def _authority(target: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", target)
    if not match:
        raise BadRequest(400, "CONNECT needs host:port")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise BadRequest(400, "port out of range")
    return _check_host(host), port


def _check_host(host: str) -> str:
    host = host.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _HOST_RE.match(host):
        raise BadRequest(400, "malformed host name")
    return host.rstrip(".")


# ---- the proxy ----------------------------------------------------------------------------------------


class _RecordLimiter:
    """At most ``RECORD_BURST`` records per ``RECORD_WINDOW`` seconds; the rest are counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window_start = 0.0
        self._count = 0
        self.suppressed = 0

    def admit(self) -> tuple[bool, int]:
        """(record this one?, how many were suppressed before it)."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= RECORD_WINDOW:
                self._window_start, self._count = now, 0
            self._count += 1
            if self._count > RECORD_BURST:
                self.suppressed += 1
                return False, 0
            suppressed, self.suppressed = self.suppressed, 0
            return True, suppressed


class EgressProxy:
    """Serves guest connections to the egress listener (``tcp.open`` streams)."""

    def __init__(self, net: NetworkManager):
        self.net = net
        self.allowed = 0
        self.refused = 0
        self._limiter = _RecordLimiter()
        self._handshakes = 0
        self._lock = threading.Lock()

    def on_open(self, sid: int, port: int, peer: str, sock: socket.socket | None = None) -> None:
        """From the agent channel's reader: never block here. ``sock``: the guest's connection
        itself (handed over, checked by ``relay.adopt``); otherwise it is stream ``sid``."""
        net = self.net
        send = net.sup.agent.send

        def refuse(reason: str) -> None:
            if sock is not None:
                reset(sock)
            else:
                net.mux.abort(sid, reason, send=send)

        if sid % 2 != 0:
            refuse("guest stream ids are even")
            return
        policy = net.policy
        if policy.mode != "allow" or port != EGRESS_GUEST_PORT:
            refuse("this sandbox has no egress proxy")
            threading.Thread(target=self._record, args=(False, "-", f"guest listener port {port}",
                                                        f"network mode is {policy.mode}", None), daemon=True).start()
            return
        with self._lock:
            busy = self._handshakes >= MAX_HANDSHAKES
            if not busy:
                self._handshakes += 1
        if busy:
            refuse(f"more than {MAX_HANDSHAKES} egress requests are being read")
            return
        pending: PendingStream | GuestConnection
        if sock is not None:
            pending = GuestConnection(net.relays, sid, sock)
        else:
            try:
                pending = net.mux.pending(sid, send)
            except (StreamLimit, ValueError) as exc:
                self._handshake_done()
                refuse(str(exc))
                return
        threading.Thread(target=self._serve, args=(pending,), name="mvm-egress", daemon=True).start()

    def _handshake_done(self) -> None:
        with self._lock:
            self._handshakes -= 1

    def _serve(self, pending: PendingStream | GuestConnection) -> None:
        try:
            self._handle(pending)
        finally:
            self._handshake_done()

    def _handle(self, pending: PendingStream | GuestConnection) -> None:
        try:
            got = self._read_head(pending)
            if got is None:
                pending.send(b"", eof=True)
                pending.finish()
                return
            head, rest = got
            try:
                request = parse_request(head)
            except BadRequest as exc:
                self._reply(pending, exc.status, str(exc))
                return
            decision = self.net.policy.decide(request.host, request.port)
            if not decision.allowed:
                self.refused += 1
                self._record(False, request.method, request.destination, decision.reason, None)
                self._reply(pending, 403, f"{request.destination} is not allowed for this sandbox: {decision.reason}")
                return
            try:
                upstream, address = _connect(decision.addresses, request.port)
            except OSError as exc:
                self._record(False, request.method, request.destination, f"unreachable: {exc}", None, error=True)
                self._reply(pending, 502, f"cannot reach {request.destination}: {exc}")
                return
            self.allowed += 1
            self._record(True, request.method, request.destination, decision.rule or "", address)
            try:
                if request.method == "CONNECT":
                    pending.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    pending.attach(upstream, rest)
                else:
                    pending.attach(upstream, request.upstream_head() + rest)
            except BaseException:
                upstream.close()
                raise
        except BadRequest as exc:
            self._reply(pending, exc.status, str(exc))
        except (StreamClosed, TimeoutError, OSError) as exc:
            pending.abort(f"egress proxy: {exc}")

    def _read_head(self, pending: PendingStream | GuestConnection) -> tuple[bytes, bytes] | None:
        buf = bytearray()
        deadline = time.monotonic() + HEAD_TIMEOUT
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(buf[: end + 4]), bytes(buf[end + 4 :])
            if len(buf) >= HEAD_LIMIT:
                raise BadRequest(431, f"request head larger than {HEAD_LIMIT} bytes")
            chunk = pending.recv(HEAD_LIMIT - len(buf), max(deadline - time.monotonic(), 0.0))
            if not chunk:
                if not buf:
                    return None
                raise BadRequest(400, "the request head ended early")
            buf += chunk

    def _reply(self, pending: PendingStream | GuestConnection, status: int, message: str) -> None:
        body = f"mvm egress proxy: {message}\n".encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Mvm-Egress: refused\r\n\r\n").encode()
        try:
            pending.send(head + body, eof=True)
            pending.finish()
        except (StreamClosed, TimeoutError):
            pending.abort("egress proxy: the client went away")

    def _record(self, allowed: bool, method: str, destination: str, reason: str, address: str | None,
                *, error: bool = False) -> None:
        record, suppressed = self._limiter.admit()
        if not record:
            return
        sup = self.net.sup
        details: dict[str, Any] = {"destination": destination[:300], "method": method[:16]}
        if address:
            details["address"] = address
        if reason:
            details["reason" if not allowed else "rule"] = reason[:300]
        if suppressed:
            details["suppressed_before"] = suppressed
        try:
            if allowed:
                audit_id = sup.audit.record("network.egress", {"destination": destination, "method": method},
                                            details=details)
                message = f"egress allowed: {method} {destination} -> {address}"
            else:
                audit_id = sup.audit.record("network.egress", {"destination": destination, "method": method},
                                            outcome="error",
                                            error_type="EgressUnreachable" if error else "EgressRefused",
                                            details=details)
                message = f"egress {'failed' if error else 'refused'}: {method} {destination} ({reason})"
        except Exception as exc:  # the audit chain failing must not take the proxy down
            audit_id = None
            message = f"egress {'allowed' if allowed else 'refused'}: {method} {destination} (audit failed: {exc})"
        if suppressed:
            message += f" [{suppressed} earlier egress records were only counted]"
        sup.logs.write("network", "system", message[:1000], audit_id, force=True)


def _connect(addresses: tuple[str, ...], port: int) -> tuple[socket.socket, str]:
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout=CONNECT_TIMEOUT), address
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")
