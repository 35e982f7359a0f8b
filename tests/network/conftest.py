"""Network tests run on every backend this machine can run (one sandbox per module and
backend: a TCG VM boot would dominate otherwise). Every server is started by the tests
themselves on 127.0.0.1 (host) or inside the sandbox; nothing leaves this machine."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import mvm
from mvm.backends import PREFERENCE, availability

TEMPLATE = "python-3.13"

#: Servers inside the guest, on its loopback: 8000 echo, 8001 sends a banner then
#: half-closes and counts what still arrives, 8002 sends "N\n"-many bytes, 8004 never reads.
GUEST_SERVERS = r'''
import hashlib, os, socket, sys, threading, time

def pattern(size):
    block = hashlib.sha256(b"mvm").digest() * 4096  # 128 KiB
    while size > 0:
        piece = block[:size]
        size -= len(piece)
        yield piece

def echo(conn):
    while data := conn.recv(1 << 16):
        conn.sendall(data)

def banner_then_sink(conn):
    conn.sendall(b"banner\n")
    conn.shutdown(socket.SHUT_WR)
    total = 0
    while data := conn.recv(1 << 16):
        total += len(data)
    with open("/tmp/halfclose.txt", "w") as f:
        f.write(str(total))

def source(conn):
    line = b""
    while not line.endswith(b"\n"):
        line += conn.recv(1)
    tag, size = line.split()
    sent = 0
    for piece in pattern(int(size)):
        conn.sendall(piece)
        sent += len(piece)
        if sent % (1 << 20) < len(piece):
            with open(f"/tmp/progress-{tag.decode()}", "w") as f:
                f.write(str(sent))
    with open(f"/tmp/progress-{tag.decode()}", "w") as f:
        f.write(str(sent))

def black_hole(conn):
    time.sleep(3600)

def serve(port, handler):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    def run(conn):
        with conn:
            try:
                handler(conn)
            except OSError:
                pass
    def loop():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=run, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

for port, handler in ((8000, echo), (8001, banner_then_sink), (8002, source), (8004, black_hole)):
    serve(port, handler)
open("/tmp/servers.ready", "w").close()
while True:
    time.sleep(3600)
'''


def _available() -> list[str]:
    names = [name for name in PREFERENCE if availability(name).ok]
    return names or ["namespace"]


@pytest.fixture(scope="module", params=_available())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def create(backend: str, network: object | None = None) -> mvm.Sandbox:
    return mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="20m", network=network,  # type: ignore[arg-type]
                              resources=mvm.resources(cpu_cores=1, memory_mb=512))


def start_guest_servers(sandbox: mvm.Sandbox) -> None:
    sandbox.files.write("/srv/servers.py", GUEST_SERVERS)
    sandbox.commands.start(["python3", "/srv/servers.py"])
    wait_guest_file(sandbox, "/tmp/servers.ready")


def wait_guest_file(sandbox: mvm.Sandbox, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not sandbox.files.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear in the guest"
        time.sleep(0.05)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def connect(port: int, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


@dataclass
class HostHttp:
    """An HTTP server on the host's 127.0.0.1 (the only kind these tests reach out to)."""

    server: http.server.ThreadingHTTPServer
    requests: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@pytest.fixture(scope="module")
def host_http() -> Iterator[tuple[HostHttp, HostHttp]]:
    """Two servers: the tests allow one and expect the other to be refused."""
    made: list[HostHttp] = []
    for _ in range(2):

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = self.server_ref  # type: ignore[attr-defined]
                host.requests.append(self.path)
                body = f"hello from {host.port} path={self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        entry = HostHttp(server)
        Handler.server_ref = entry  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        made.append(entry)
    yield made[0], made[1]
    for entry in made:
        entry.server.shutdown()
        entry.server.server_close()


@pytest.fixture(scope="module")
def host_tcp() -> Iterator[tuple[int, list[tuple[str, int]]]]:
    """A TCP server on the host's 127.0.0.1 that greets and records who connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    seen: list[tuple[str, int]] = []

    def loop() -> None:
        while True:
            try:
                conn, addr = srv.accept()
            except OSError:
                return
            seen.append(addr)
            with conn:
                conn.sendall(b"hello-from-host")

    threading.Thread(target=loop, daemon=True).start()
    yield srv.getsockname()[1], seen
    srv.close()
