"""Allow-listed egress: the guest reaches host servers (on the host's 127.0.0.1, named
``host.mvm.internal:PORT`` in the allow-list) only through the supervisor's proxy;
everything else is refused, logged and audited."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Iterator

import pytest
from nethelpers import HostHttp, create

import mvm
from mvm.backends.base import HOST_ALIAS
from mvm.supervisor.egress import EgressPolicy, is_sensitive, parse_request

#: Run in the guest: GET through the proxy (plain HTTP) and a CONNECT tunnel, per port given.
GUEST_CLIENT = r'''
import http.client, json, os, sys, urllib.request
out = {"env": {k: os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "NO_PROXY")}}
host = sys.argv[1]
for port in sys.argv[2:]:
    try:
        out[f"get:{port}"] = urllib.request.urlopen(f"http://{host}:{port}/get", timeout=30).read().decode()
    except Exception as exc:
        out[f"get:{port}"] = f"{type(exc).__name__}: {exc}"
    try:
        proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
        conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=30)
        conn.set_tunnel(host, int(port))
        conn.request("GET", "/tunnel")
        out[f"connect:{port}"] = conn.getresponse().read().decode()
    except Exception as exc:
        out[f"connect:{port}"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def box(backend: str, host_http: tuple[HostHttp, HostHttp]) -> Iterator[mvm.Sandbox]:
    allowed, _ = host_http
    with create(backend, mvm.network(mode="allow", allow=[f"{HOST_ALIAS}:{allowed.port}"])) as sandbox:
        sandbox.files.write("/srv/client.py", GUEST_CLIENT)
        yield sandbox


def _probe(box: mvm.Sandbox, *ports: int, host: str = HOST_ALIAS, env: dict | None = None) -> dict:
    result = box.commands.run(["python3", "/srv/client.py", host, *map(str, ports)], env=env,
                              timeout_seconds=120)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _network_log(box: mvm.Sandbox) -> list[str]:
    return [e.message for e in box.logs() if e.source == "network"]


def test_allowed_destination_works_and_the_rest_is_refused(box: mvm.Sandbox,
                                                           host_http: tuple[HostHttp, HostHttp]) -> None:
    allowed, refused = host_http
    refused_before = len(refused.requests)
    out = _probe(box, allowed.port, refused.port)
    assert out["env"] == {"HTTP_PROXY": "http://127.0.0.1:3128", "HTTPS_PROXY": "http://127.0.0.1:3128",
                          "http_proxy": "http://127.0.0.1:3128", "NO_PROXY": "localhost,127.0.0.1"}
    assert out[f"get:{allowed.port}"] == f"hello from {allowed.port} path=/get"
    assert out[f"connect:{allowed.port}"] == f"hello from {allowed.port} path=/tunnel"
    assert out[f"get:{refused.port}"].startswith("HTTPError: HTTP Error 403")
    assert "403" in out[f"connect:{refused.port}"]
    assert len(refused.requests) == refused_before  # the refused server never saw a byte
    log = _network_log(box)
    assert f"egress allowed: GET {HOST_ALIAS}:{allowed.port} -> 127.0.0.1" in log
    assert f"egress allowed: CONNECT {HOST_ALIAS}:{allowed.port} -> 127.0.0.1" in log
    how = f"allow '{HOST_ALIAS}:{refused.port}' and connect to {HOST_ALIAS}:{refused.port} to reach the host's " \
          f"127.0.0.1:{refused.port}"
    assert f"egress refused: GET {HOST_ALIAS}:{refused.port} (not in the allow-list ({how}))" in log
    assert f"egress refused: CONNECT {HOST_ALIAS}:{refused.port} (not in the allow-list ({how}))" in log
    audit = [e.message for e in box.logs() if e.source == "audit"]
    assert "network.egress ok" in audit and "network.egress error (EgressRefused)" in audit
    egress = box.describe().network["egress"]
    assert egress["ready"] and egress["allowed"] >= 2 and egress["refused"] >= 2


def test_allow_mode_has_no_interface_either(box: mvm.Sandbox) -> None:
    result = box.commands.run(["python3", "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"])
    assert result.stdout.strip() == "['lo']"


def test_private_ranges_need_an_explicit_entry(box: mvm.Sandbox, host_http: tuple[HostHttp, HostHttp]) -> None:
    allowed, _ = host_http
    before = len(allowed.requests)
    through_proxy = {"NO_PROXY": "", "no_proxy": ""}  # loopback names normally never reach the proxy
    try:
        # loopback asked of the proxy is refused with the way to the host's loopback ...
        for host in ("127.0.0.1", "localhost"):
            assert "403" in _probe(box, allowed.port, host=host, env=through_proxy)[f"get:{allowed.port}"]
            assert any(f"({host} is the sandbox's own loopback; allow '{HOST_ALIAS}:{allowed.port}'" in m
                       for m in _network_log(box))
        # ... a wildcard entry never covers host.mvm.internal, nor private addresses
        box.network.update(allow=[f"*:{allowed.port}"], allow_wildcards=True)
        assert "403" in _probe(box, allowed.port)[f"get:{allowed.port}"]
        assert "403" in _probe(box, allowed.port, host="10.0.0.1")[f"get:{allowed.port}"]
        assert any("10.0.0.1 is not a public address" in m for m in _network_log(box))
        assert len(allowed.requests) == before  # none of these got through
    finally:
        box.network.update(allow=[f"{HOST_ALIAS}:{allowed.port}"], allow_wildcards=False)
    assert _probe(box, allowed.port)[f"get:{allowed.port}"].startswith("hello from")


def test_a_loopback_entry_is_refused_with_the_host_alias_named(box: mvm.Sandbox) -> None:
    for entry in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "127.0.0.0/8:8080"):
        with pytest.raises(mvm.InvalidNetworkPolicy) as err:
            mvm.network(mode="allow", allow=[entry], allow_wildcards=True)
        assert err.value.field == f"network.allow[{entry!r}]"
        assert f"allow '{HOST_ALIAS}:8080' and connect to {HOST_ALIAS}:8080" in err.value.message
        with pytest.raises(mvm.InvalidNetworkPolicy):  # the same check on a running sandbox
            box.network.update(allow=[entry])


def test_network_update_validates_switches_modes_and_is_audited(box: mvm.Sandbox,
                                                                 host_http: tuple[HostHttp, HostHttp]) -> None:
    allowed, refused = host_http
    with pytest.raises(mvm.InvalidNetworkPolicy) as err:
        box.network.update(allow=["pypi.org:99999"])
    assert "pypi.org:99999" in err.value.field
    with pytest.raises(mvm.InvalidNetworkPolicy) as err:
        box.network.update(allow=["*.example.com:443"])
    assert "wildcards" in str(err.value)
    policy = box.network.update(allow=[f"{HOST_ALIAS}:{refused.port}"])
    assert policy["allow"] == [f"{HOST_ALIAS}:{refused.port}"]
    out = _probe(box, allowed.port, refused.port)
    assert out[f"get:{refused.port}"].startswith("hello from") and "403" in out[f"get:{allowed.port}"]
    try:
        assert box.network.update(allow=[])["mode"] == "deny"  # no proxy, no proxy env
        env = box.commands.run(["env"]).stdout
        assert "HTTP_PROXY" not in env
        gone = box.commands.run(["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 3128))"])
        assert "ConnectionRefusedError" in gone.stderr  # the listener is gone too
    finally:
        box.network.update(allow=[f"{HOST_ALIAS}:{allowed.port}"])
    assert box.describe().network["mode"] == "allow"
    assert any(m.startswith("network policy updated: mode deny") for m in _network_log(box))
    assert "network.update ok" in [e.message for e in box.logs() if e.source == "audit"]


#: Run in the guest: a CONNECT tunnel to an echo server; sends N MiB, half-closes, reads the echo.
TUNNEL_CLIENT = r'''
import hashlib, json, os, socket, sys, threading
from urllib.parse import urlsplit
host, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proxy = urlsplit(os.environ["HTTPS_PROXY"])
sock = socket.create_connection((proxy.hostname, proxy.port), timeout=60)
sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
head = b""
while not head.endswith(b"\r\n\r\n"):
    head += sock.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
block = os.urandom(1 << 20)
sent = hashlib.sha256()
def send():
    for index in range(mib):
        chunk = index.to_bytes(8, "big") + block[8:]
        sent.update(chunk)
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)  # half-close: the echo keeps coming
sender = threading.Thread(target=send)
sender.start()
got, total = hashlib.sha256(), 0
while data := sock.recv(1 << 20):
    got.update(data)
    total += len(data)
sender.join()
print(json.dumps({"sent": sent.hexdigest(), "echoed": got.hexdigest(), "bytes": total}))
'''


@pytest.fixture(scope="module")
def host_echo() -> Iterator[int]:
    """An echo server on the host's 127.0.0.1 that passes on its client's EOF (half-close)."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def test_a_large_transfer_through_the_proxy_is_intact_and_half_closes(
        box: mvm.Sandbox, host_http: tuple[HostHttp, HostHttp], host_echo: int) -> None:
    allowed, _ = host_http
    mib = 8 if box.describe().isolation == "vm" else 96
    box.files.write("/srv/tunnel.py", TUNNEL_CLIENT)
    box.network.update(allow=[f"{HOST_ALIAS}:{allowed.port}", f"{HOST_ALIAS}:{host_echo}"])
    try:
        result = box.commands.run(["python3", "/srv/tunnel.py", HOST_ALIAS, str(host_echo), str(mib)],
                                  timeout_seconds=300)
    finally:
        box.network.update(allow=[f"{HOST_ALIAS}:{allowed.port}"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["bytes"] == mib << 20 and out["echoed"] == out["sent"]
    assert f"egress allowed: CONNECT {HOST_ALIAS}:{host_echo} -> 127.0.0.1" in _network_log(box)
    assert box.describe().network["relay"] == ("agent-channel" if box.describe().isolation == "vm"
                                               else "supervisor-splice")


# ---- the policy itself (no sandbox) -------------------------------------------------------------


def _policy(*allow: str, wildcards: bool = False) -> EgressPolicy:
    return EgressPolicy.from_config({"mode": "allow", "allow": list(allow), "allow_wildcards": wildcards})


def _resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("unknown host")
        return table[host]

    return resolve


def test_policy_decisions() -> None:
    dns = _resolver({"pypi.org": ["151.101.0.223"], "files.pythonhosted.org": ["151.101.64.223"],
                     "evil.example": ["10.0.0.5"], "mixed.example": ["10.0.0.6", "93.184.216.34"],
                     "a.example.com": ["93.184.216.35"], "example.com": ["93.184.216.34"],
                     "rebind.example": ["127.0.0.1"]})
    policy = _policy("pypi.org:443", "files.pythonhosted.org:443", "192.168.7.1:8080", "evil.example:443",
                     "mixed.example:443", f"{HOST_ALIAS}:8080")
    assert policy.decide("pypi.org", 443, dns).addresses == ("151.101.0.223",)
    assert policy.decide("PyPI.org.", 443, dns).allowed  # case and a trailing dot do not matter
    assert not policy.decide("pypi.org", 80, dns).allowed  # the port is part of the entry
    assert not policy.decide("pypi.org.evil.example", 443, dns).allowed
    assert policy.decide("192.168.7.1", 8080, dns).allowed  # listed explicitly
    assert not policy.decide("192.168.7.2", 8080, dns).allowed
    assert policy.decide(HOST_ALIAS, 8080, dns).addresses == ("127.0.0.1",)  # the host's loopback, not resolved
    assert not policy.decide(HOST_ALIAS, 8081, dns).allowed
    for loopback in ("127.0.0.1", "::1", "localhost", "::ffff:127.0.0.1"):
        assert "own loopback" in policy.decide(loopback, 8080, dns).reason
    assert not policy.decide("evil.example", 443, dns).allowed  # a name resolving to a private address
    rebound = _policy("rebind.example:8080").decide("rebind.example", 8080, dns)
    assert not rebound.allowed and f"allow '{HOST_ALIAS}:8080'" in rebound.reason  # ... or to loopback
    assert policy.decide("mixed.example", 443, dns).addresses == ("93.184.216.34",)  # private ones dropped
    assert policy.decide("::ffff:192.168.7.1", 8080, dns).allowed  # v4-mapped: the same address
    wild = _policy("*.example.com:443", "*:80", "*.internal:80", "10.1.0.0/16:22", wildcards=True)
    assert not wild.decide(HOST_ALIAS, 80, dns).allowed  # only its own entry reaches the host
    assert wild.decide("a.example.com", 443, dns).allowed
    assert not wild.decide("example.com", 443, dns).allowed  # "*." needs a subdomain
    assert wild.decide("93.184.216.34", 80, dns).allowed
    for private in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "192.168.1.1", "100.64.0.1", "::1", "fd00::1",
                    "fe80::1", "0.0.0.0"):
        assert not wild.decide(private, 80, dns).allowed, private  # a wildcard never reaches private ranges
    assert wild.decide("10.1.2.3", 22, dns).allowed  # ...but a CIDR entry is explicit
    assert not wild.decide("10.2.2.3", 22, dns).allowed
    denied = EgressPolicy.from_config({"mode": "deny"})
    assert not denied.decide("pypi.org", 443, dns).allowed
    assert all(is_sensitive(ipaddress.ip_address(a)) for a in ("169.254.169.254", "192.0.2.1", "::ffff:10.0.0.1"))
    assert not is_sensitive(ipaddress.ip_address("151.101.0.223"))


@pytest.mark.parametrize("head, expected", [
    (b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n", ("CONNECT", "pypi.org", 443)),
    (b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n", ("CONNECT", "::1", 8443)),
    (b"GET http://Example.COM/a?b=c HTTP/1.1\r\nProxy-Connection: keep-alive\r\n\r\n", ("GET", "example.com", 80)),
    (b"POST http://127.0.0.1:9000/x HTTP/1.0\r\n\r\n", ("POST", "127.0.0.1", 9000)),
])
def test_proxy_requests_parse(head: bytes, expected: tuple) -> None:
    request = parse_request(head)
    assert (request.method, request.host, request.port) == expected
    if request.method != "CONNECT":
        upstream = request.upstream_head().decode()
        assert upstream.split("\r\n")[0].split(" ")[1].startswith("/")
        assert "Proxy-Connection" not in upstream and upstream.endswith("Connection: close\r\n\r\n")


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\n\r\n",  # origin-form: not a proxy request
    b"GET https://pypi.org/ HTTP/1.1\r\n\r\n",  # https goes through CONNECT
    b"CONNECT pypi.org HTTP/1.1\r\n\r\n",
    b"CONNECT bad_host!:443 HTTP/1.1\r\n\r\n",
    b"CONNECT pypi.org:70000 HTTP/1.1\r\n\r\n",
    b"GET http://x/ SPDY/3\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nBroken header\r\n\r\n",
])
def test_bad_proxy_requests_are_refused(head: bytes) -> None:
    from mvm.supervisor.egress import BadRequest

    with pytest.raises(BadRequest):
        parse_request(head)
