"""Helpers of the network tests (a module of its own: ``conftest`` names clash across test dirs)."""

from __future__ import annotations

import http.server
import socket
import time
from dataclasses import dataclass, field

import mvm

TEMPLATE = "python-3.13"

#: Servers inside the guest, on its loopback: 8000 echo, 8001 sends a banner then
#: half-closes and counts what still arrives, 8002 sends "N\n"-many bytes, 8004 never reads,
#: 8006 resets the connection ("reset-me\n") or records how the host's side ended ("watch\n").
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

def resets(conn):
    line = b""
    while not line.endswith(b"\n"):
        line += conn.recv(1)
    if line == b"reset-me\n":  # reset the connection from this side
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()
        return
    open("/tmp/reset-watching", "w").close()
    try:  # "watch\n": how does the host's side end?
        while conn.recv(1 << 16):
            pass
        outcome = "eof"
    except ConnectionResetError:
        outcome = "reset"
    with open("/tmp/reset-seen.tmp", "w") as f:
        f.write(outcome)
    os.rename("/tmp/reset-seen.tmp", "/tmp/reset-seen.txt")

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

for port, handler in ((8000, echo), (8001, banner_then_sink), (8002, source), (8004, black_hole), (8006, resets)):
    serve(port, handler)
open("/tmp/servers.ready", "w").close()
while True:
    time.sleep(3600)
'''

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
