"""The agent's ``tcp.*`` operations against the real agent process (it runs on this host
here, so its loopback is ours): connect, listen, stream frames, errors, reconnects."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from agent_harness import AgentClient, AgentProcess, default_agent_command

from mvm.protocol import codec
from mvm.protocol.codec import Frame


class StreamClient(AgentClient):
    """The harness client, with a helper to read one stream's bytes."""

    def stream_bytes(self, sid: int, until_eof: bool = True, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                frames = [f for f in self.data if f.id == sid]
                if frames and (not until_eof or frames[-1].header.get("eof")):
                    return b"".join(f.payload for f in frames)
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"stream {sid}: {[f.header for f in frames]}"
                self._cond.wait(remaining)

    def wait_event(self, name: str, timeout: float = 10) -> Frame:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self._events if e.header["event"] == name]
                if found:
                    return found[-1]
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {name} event"
                self._cond.wait(remaining)


@pytest.fixture
def client(spawn_agent: Callable[..., AgentProcess]) -> StreamClient:
    started = spawn_agent()
    return StreamClient(started.process, started.sock)


def _server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(10)
    return srv, srv.getsockname()[1]


def test_agent_info_lists_the_tcp_ops(client: StreamClient) -> None:
    assert {"tcp.connect", "tcp.listen", "tcp.unlisten"} <= set(client.call("agent.info")["ops"])


def test_connect_relays_bytes_and_eof_both_ways(client: StreamClient) -> None:
    srv, port = _server()
    result = client.call("tcp.connect", stream=1, port=port)
    assert result["stream"] == 1 and result["window"] >= codec.TCP_WINDOW
    conn, _ = srv.accept()
    client.channel.send_raw(codec.data(1, "tcp", b"hello guest"))
    client.channel.send_raw(codec.data(1, "tcp", b"", eof=True))
    received = b""
    conn.settimeout(10)
    while chunk := conn.recv(100):  # our EOF arrives as the socket's EOF
        received += chunk
    assert received == b"hello guest"
    conn.sendall(b"hello host")
    conn.close()
    assert client.stream_bytes(1) == b"hello host"


def test_connect_errors_name_the_problem(client: StreamClient) -> None:
    srv, port = _server()
    srv.close()  # nothing listens there any more
    assert client.error("tcp.connect", stream=1, port=port)["type"] == "ConnectionRefused"
    error = client.error("tcp.connect", stream=3, port=80, host="192.0.2.1")
    assert (error["type"], error["field"]) == ("InvalidArgument", "host")  # loopback only
    error = client.error("tcp.connect", stream=2, port=80)
    assert (error["type"], error["field"]) == ("InvalidArgument", "stream")  # host ids are odd
    assert client.error("tcp.connect", stream=5, port=0)["field"] == "port"
    _srv2, port2 = _server()
    client.call("tcp.connect", stream=7, port=port2)
    assert client.error("tcp.connect", stream=7, port=port2)["field"] == "stream"  # already open


def test_a_host_abort_resets_the_guest_connection(client: StreamClient) -> None:
    srv, port = _server()
    client.call("tcp.connect", stream=9, port=port)
    conn, _ = srv.accept()
    conn.settimeout(10)
    client.channel.send_raw(codec.event("tcp.close", stream=9, reason="test"))
    with pytest.raises(ConnectionResetError):
        conn.recv(10)


def test_listen_announces_each_connection_with_tcp_open(client: StreamClient) -> None:
    port = client.call("tcp.listen", port=0)["port"]
    assert client.call("tcp.listen", port=port) == {"port": port, "existing": True}
    guest = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened = client.wait_event("tcp.open")
    sid = opened.header["stream"]
    assert sid % 2 == 0 and opened.header["port"] == port and opened.header["peer"].startswith("127.0.0.1:")
    guest.sendall(b"CONNECT x:1 HTTP/1.1\r\n\r\n")
    guest.shutdown(socket.SHUT_WR)
    assert client.stream_bytes(sid) == b"CONNECT x:1 HTTP/1.1\r\n\r\n"
    client.channel.send_raw(codec.data(sid, "tcp", b"HTTP/1.1 403 Forbidden\r\n\r\n", eof=True))
    assert guest.recv(100) == b"HTTP/1.1 403 Forbidden\r\n\r\n"
    assert client.call("tcp.unlisten", port=port) == {"closed": True}  # closed by the time it answers
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert client.error("tcp.listen", port=80, host="0.0.0.0")["field"] == "host"


def test_a_new_hello_resets_the_streams_of_the_old_connection(client: StreamClient) -> None:
    srv, port = _server()
    client.call("tcp.connect", stream=11, port=port)
    conn, _ = srv.accept()
    conn.settimeout(10)
    client.channel.send_raw(codec.hello("supervisor"))  # a reattaching host
    client.hellos.get(timeout=10)
    with pytest.raises(ConnectionResetError):
        conn.recv(10)
    threading.Event().wait(0.05)
    assert client.call("ping") == {}


# ---- handoff: the connection itself goes to the host (a socketpair: the namespace backend) ------


def _opens(client: StreamClient, count: int, timeout: float = 10) -> list[Frame]:
    deadline = time.monotonic() + timeout
    with client._cond:
        while True:
            found = [e for e in client._events if e.header["event"] == "tcp.open"]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(found)} tcp.open events, not {count}"
            client._cond.wait(remaining)


def test_a_handoff_connect_answers_with_the_connected_socket(client: StreamClient) -> None:
    assert client.hello["fd_passing"] is True
    srv, port = _server()
    frame = client.request("tcp.connect", {"stream": 13, "port": port, "handoff": True})
    assert frame.header["ok"] and frame.header["result"] == {"stream": 13, "handoff": True}
    assert frame.header["fds"] == 1 and len(frame.fds) == 1
    handed = socket.socket(fileno=frame.fds[0])
    handed.settimeout(10)
    conn, _ = srv.accept()
    conn.settimeout(10)
    assert handed.getpeername() == conn.getsockname()
    handed.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    conn.sendall(b"pong")
    assert handed.recv(4) == b"pong"
    handed.close()  # the agent kept no reference (and no stream): ours ends the connection
    assert conn.recv(10) == b""
    assert client.call("tcp.connect", stream=13, port=port)["stream"] == 13  # the id was never taken


def test_a_handoff_listener_hands_each_accepted_connection_over(client: StreamClient) -> None:
    port = client.call("tcp.listen", port=0, handoff=True)["port"]
    guest = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened = _opens(client, 1)[0]
    assert opened.header["stream"] % 2 == 0 and opened.header["fds"] == 1 and len(opened.fds) == 1
    handed = socket.socket(fileno=opened.fds[0])
    handed.settimeout(10)
    assert handed.getsockname()[1] == port and handed.getpeername() == guest.getsockname()
    guest.sendall(b"CONNECT")
    assert handed.recv(7) == b"CONNECT"
    handed.close()
    assert guest.recv(1) == b""
    # a host that cannot take sockets listens again without handoff: streams again
    assert client.call("tcp.listen", port=port) == {"port": port, "existing": True}
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened = _opens(client, 2)[1]
    assert "fds" not in opened.header and opened.fds == ()
    second.sendall(b"x")
    second.shutdown(socket.SHUT_WR)
    assert client.stream_bytes(opened.header["stream"]) == b"x"


def test_a_transport_that_cannot_pass_sockets_refuses_handoff_and_streams() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    agent_end = socket.create_connection(listener.getsockname())
    host_end, _ = listener.accept()
    listener.close()
    process = subprocess.Popen([*default_agent_command(), "--fd", str(agent_end.fileno())],
                               pass_fds=[agent_end.fileno()])
    agent_end.close()
    client = StreamClient(process, host_end)
    try:
        assert client.hello["fd_passing"] is False  # a TCP connection carries no descriptors
        srv, port = _server()
        for op, args in (("tcp.connect", {"stream": 1, "port": port}), ("tcp.listen", {"port": 0})):
            error = client.error(op, handoff=True, **args)
            assert (error["type"], error["field"]) == ("InvalidArgument", "handoff")
        assert client.call("tcp.connect", stream=1, port=port)["window"] >= codec.TCP_WINDOW
        conn, _ = srv.accept()
        conn.sendall(b"over the channel")
        conn.close()
        assert client.stream_bytes(1) == b"over the channel"
    finally:
        host_end.shutdown(socket.SHUT_RDWR)
        host_end.close()
        assert process.wait(10) == 0
