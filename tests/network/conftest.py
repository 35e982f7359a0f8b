"""Network tests run on every backend this machine can run (one sandbox per module and
backend: a TCG VM boot would dominate otherwise). Every server is started by the tests
themselves on 127.0.0.1 (host) or inside the sandbox; nothing leaves this machine."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from nethelpers import HostHttp

from mvm.backends import PREFERENCE, availability


def _available() -> list[str]:
    names = [name for name in PREFERENCE if availability(name).ok]
    return names or ["namespace"]


@pytest.fixture(scope="module", params=_available())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)














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
