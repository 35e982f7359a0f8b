"""The supervisor's socket-to-socket relay (``supervisor/relay.py``) over real loopback TCP:
what ``adopt`` takes from an agent, bytes intact both ways, half-close, resets, aborts,
many at once, the limit, and the copying loop when no pipe is left. (End to end through
a namespace sandbox: tests/network.)"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from waiting import wait_for

from mvm import errors
from mvm.protocol.tcpmux import StreamClosed
from mvm.supervisor.relay import Relay, Relays, adopt


class Ends:
    """client <-> [host | relay | guest] <-> server: the relay's two sockets and the far ends."""

    def __init__(self) -> None:
        front = socket.create_server(("127.0.0.1", 0))
        back = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(front.getsockname(), timeout=30)
        self.host, _ = front.accept()
        self.guest = socket.create_connection(back.getsockname(), timeout=30)
        self.server, _ = back.accept()
        self.server.settimeout(30)
        front.close()
        back.close()


@pytest.fixture
def relays() -> Iterator[Relays]:
    made = Relays()
    yield made
    made.close()


def _start(relays: Relays, rid: int = 1) -> tuple[Ends, list[Relay]]:
    ends = Ends()
    done: list[Relay] = []
    relays.start(rid, ends.host, ends.guest, on_done=done.append)
    return ends, done


def _drain(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


# ---- adopt: only what was asked for --------------------------------------------------------------


def test_adopt_takes_a_loopback_tcp_connection_at_the_port_asked_for() -> None:
    ends = Ends()
    server_port = ends.server.getsockname()[1]
    taken = adopt(os.dup(ends.guest.fileno()), peer_port=server_port)  # a forward's guest side
    assert taken.getpeername()[1] == server_port and taken.getblocking()
    taken.close()
    accepted = adopt(os.dup(ends.server.fileno()), local_port=server_port)  # an egress connection
    assert accepted.getsockname()[1] == server_port
    accepted.close()


def _refused(make: str) -> str:
    """The refusal ``adopt`` gives a descriptor of kind ``make``; checks it was closed."""
    keep: list[socket.socket] = []
    if make == "pipe":
        fd, other = os.pipe()
        os.close(other)
    elif make == "unix socket":
        a, b = socket.socketpair()
        keep.append(b)
        fd = a.detach()
    elif make == "udp socket":
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.connect(("127.0.0.1", 9))
        fd = udp.detach()
    elif make == "listening socket":
        fd = socket.create_server(("127.0.0.1", 0)).detach()
    else:  # "another port"
        ends = Ends()
        keep += [ends.client, ends.host, ends.server]
        fd = ends.guest.detach()
    with pytest.raises(errors.SandboxError) as err:
        adopt(fd, peer_port=1)
    assert _closed(fd)
    for sock in keep:
        sock.close()
    return err.value.message


@pytest.mark.parametrize("make", ["pipe", "unix socket", "udp socket", "listening socket", "another port"])
def test_adopt_refuses_and_closes_anything_else(make: str) -> None:
    message = _refused(make)
    assert "handed over" in message


# ---- relaying ----------------------------------------------------------------------------------


def test_a_large_transfer_both_ways_arrives_intact_and_is_counted(relays: Relays) -> None:
    ends, done = _start(relays)
    size = 48 << 20
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    got: dict[str, str] = {}

    def send(sock: socket.socket, block: bytes) -> None:
        for index in range(size // len(block)):
            sock.sendall(index.to_bytes(8, "big") + block[8:])
        sock.shutdown(socket.SHUT_WR)

    def receive(name: str, sock: socket.socket) -> None:
        digest = hashlib.sha256()
        while data := sock.recv(1 << 20):
            digest.update(data)
        got[name] = digest.hexdigest()

    threads = [threading.Thread(target=send, args=(ends.client, up)),
               threading.Thread(target=send, args=(ends.server, down)),
               threading.Thread(target=receive, args=("server", ends.server)),
               threading.Thread(target=receive, args=("client", ends.client))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    def expected(block: bytes) -> str:
        digest = hashlib.sha256()
        for index in range(size // len(block)):
            digest.update(index.to_bytes(8, "big") + block[8:])
        return digest.hexdigest()

    assert got == {"server": expected(up), "client": expected(down)}
    wait_for(lambda: done, "the relay ending after both EOFs", timeout=10)
    assert (done[0].bytes_in, done[0].bytes_out, done[0].aborted) == (size, size, False)
    assert relays.count() == 0


def test_half_close_either_way_keeps_the_other_direction(relays: Relays) -> None:
    ends, done = _start(relays)
    ends.client.sendall(b"question")
    ends.client.shutdown(socket.SHUT_WR)
    assert _drain_until(ends.server, 8) == b"question"
    assert ends.server.recv(10) == b""  # our EOF arrived...
    ends.server.sendall(b"answer after your EOF")  # ...and the other way still works
    ends.server.shutdown(socket.SHUT_WR)
    assert _drain(ends.client) == b"answer after your EOF"
    wait_for(lambda: done, "the relay ending", timeout=10)
    ends2, _ = _start(relays, 3)  # and the guest closing first
    ends2.server.sendall(b"banner")
    ends2.server.shutdown(socket.SHUT_WR)
    assert _drain(ends2.client) == b"banner"
    ends2.client.sendall(b"still heard")
    ends2.client.shutdown(socket.SHUT_WR)
    assert _drain(ends2.server) == b"still heard"


def _drain_until(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk
        data += chunk
    return data


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_reset_on_one_side_resets_the_other(relays: Relays, side: str) -> None:
    ends, done = _start(relays)
    resetting, other = (ends.server, ends.client) if side == "server" else (ends.client, ends.server)
    other.settimeout(30)
    resetting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    resetting.close()
    with pytest.raises(ConnectionResetError):
        other.recv(10)
    wait_for(lambda: done, "the relay ending", timeout=10)
    assert done[0].aborted and "connection failed" in done[0].reason


def test_abort_resets_both_ends_even_with_a_writer_stuck_on_a_full_socket(relays: Relays) -> None:
    ends, done = _start(relays)
    ends.client.setblocking(False)
    try:
        while True:  # the server never reads: the relay blocks writing into it
            ends.client.send(b"x" * 65536)
    except BlockingIOError:
        pass
    assert relays.abort(1, "the port forward was closed")
    wait_for(lambda: done, "the relay ending", timeout=10)
    assert done[0].reason == "the port forward was closed"
    for sock in (ends.client, ends.server):
        sock.setblocking(True)
        sock.settimeout(30)
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 20):  # (the server may read what was queued first)
                pass
    assert not relays.abort(1, "again")


def _pump(sock: socket.socket, outcome: dict[str, str]) -> None:
    try:
        while True:
            sock.sendall(b"x" * 65536)
    except OSError as exc:
        outcome["sender"] = type(exc).__name__


def _count_until_the_end(sock: socket.socket, received: list[int], outcome: dict[str, str]) -> None:
    try:
        while data := sock.recv(1 << 20):
            received[0] += len(data)
        outcome["receiver"] = "EOF"
    except OSError as exc:
        outcome["receiver"] = type(exc).__name__


def _abort_mid_transfer(relays: Relays, rid: int, client_sends: bool) -> dict[str, str]:
    ends, done = _start(relays, rid)
    sender, receiver = (ends.client, ends.server) if client_sends else (ends.server, ends.client)
    outcome: dict[str, str] = {}
    received = [0]
    threading.Thread(target=_pump, args=(sender, outcome), daemon=True).start()
    threading.Thread(target=_count_until_the_end, args=(receiver, received, outcome), daemon=True).start()
    wait_for(lambda: received[0] >= 1 << 20, "bytes moving", timeout=30)
    assert relays.abort(rid, "the port forward was closed")
    wait_for(lambda: done and len(outcome) == 2, "the relay ending and both far ends told", timeout=30)
    for sock in (ends.client, ends.server):
        sock.close()
    return outcome


def test_an_abort_mid_transfer_is_a_reset_never_a_clean_end(relays: Relays) -> None:
    """Aborted while bytes flow (a write in flight, the receiving far end's window open),
    one way and then the other: the receiver reads what arrived and then a reset, and the
    sender's next write fails. A FIN sent ahead of the RST would show the receiver a
    clean end of a stream that was cut. (One thread per far end: a socket reports its
    reset to one call only.)"""
    for rid in range(1, 41, 2):
        outcome = _abort_mid_transfer(relays, rid, client_sends=rid % 4 == 1)
        assert outcome["receiver"] == "ConnectionResetError", f"connection {rid}: {outcome}"
        assert outcome["sender"] in ("ConnectionResetError", "BrokenPipeError"), f"connection {rid}: {outcome}"


def test_many_relays_at_once_and_the_limit(relays: Relays) -> None:
    pairs = [_start(relays, rid) for rid in range(1, 101, 2)]
    assert relays.count() == 50
    payload = {rid: os.urandom(200_000) for rid in range(1, 101, 2)}
    for (ends, _), rid in zip(pairs, payload, strict=True):
        threading.Thread(target=lambda e=ends, r=rid: (e.server.sendall(payload[r]), e.server.shutdown(socket.SHUT_WR)),
                         daemon=True).start()
    for (ends, _), rid in zip(pairs, payload, strict=True):
        ends.client.shutdown(socket.SHUT_WR)
        assert _drain(ends.client) == payload[rid]
    wait_for(lambda: relays.count() == 0, "every relay ending")
    small = Relays(max_relays=1)
    first = _start(small, 1)  # (kept: its far ends' closing would end it)
    extra = Ends()
    with pytest.raises(StreamClosed, match="already open"):
        small.start(3, extra.host, extra.guest)
    extra.client.settimeout(30)
    with pytest.raises(ConnectionResetError):  # refused: reset, not left open
        extra.client.recv(10)
    assert small.count() == 1 and first[0].client.fileno() >= 0
    small.close()


#: A child process's start: a relay ``Ends`` and ``Relays``, then every descriptor below
#: the limit taken but ``free`` (its first argument).
AT_THE_DESCRIPTOR_LIMIT = r'''
import os, resource, socket, sys
free = int(sys.argv[1])
sys.path[:0] = sys.argv[2:]
from test_relay import Ends
from mvm.protocol.tcpmux import StreamClosed
from mvm.supervisor.relay import Relays
ends = Ends()
relays = Relays()
highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + free, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    while True:  # fill the gaps below the limit
        os.open(os.devnull, os.O_RDONLY)
except OSError:
    pass
for fd in range(highest + 1, highest + 1 + free):
    os.close(fd)
'''

COPY_WITHOUT_PIPES = r'''
try:
    os.pipe()
    sys.exit("a pipe could still be made")
except OSError:
    pass
relays.start(1, ends.host, ends.guest)
data = os.urandom(3 << 20)
ends.client.sendall(data)
ends.client.shutdown(socket.SHUT_WR)
got = b""
while chunk := ends.server.recv(1 << 20):
    got += chunk
ends.server.sendall(b"back")
ends.server.shutdown(socket.SHUT_WR)
assert got == data and ends.client.recv(10) == b"back"
print("copied")
'''

NO_DESCRIPTOR_LEFT = r'''
try:
    relays.start(1, ends.host, ends.guest)
    sys.exit("relayed without a descriptor for its wake eventfd")
except StreamClosed as exc:
    print(exc)
assert ends.host.fileno() == -1 and ends.guest.fileno() == -1 and relays.count() == 0
for sock in (ends.client, ends.server):
    try:
        sock.recv(10)
        sys.exit("a far end was not reset")
    except ConnectionResetError:
        pass
print("reset")
'''


def _run_at_the_descriptor_limit(script: str, free: int) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [here, os.path.dirname(here), os.path.join(here, "..", "..", "src")]
    result = subprocess.run([sys.executable, "-c", AT_THE_DESCRIPTOR_LIMIT + script, str(free), *path],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_a_pipe_left_the_relay_copies() -> None:
    """One descriptor left, no pipe can be made: the buffer loop relays the same bytes."""
    assert _run_at_the_descriptor_limit(COPY_WITHOUT_PIPES, free=1) == "copied\n"


def test_without_any_descriptor_left_the_connection_is_refused_and_reset() -> None:
    """No descriptor for the relay's wake eventfd: refused, both far ends reset, nothing kept."""
    said = _run_at_the_descriptor_limit(NO_DESCRIPTOR_LEFT, free=0)
    assert said.startswith("no descriptor is left to relay connection 1: ") and said.endswith("\nreset\n"), said
