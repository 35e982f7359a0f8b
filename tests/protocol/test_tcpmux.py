"""TCP streams over a framed channel (``mvm.protocol.tcpmux``): two muxes joined by a
socketpair, real loopback sockets on both sides; plus hostile peers and codec checks."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from waiting import wait_for, wait_stalled

from mvm.protocol import codec
from mvm.protocol.channel import ChannelClosed, FramedChannel
from mvm.protocol.codec import TCP_WINDOW, Frame, FrameDecoder, ProtocolError
from mvm.protocol.tcpmux import StreamClosed, StreamMux, id_counter


def _reader(channel: FramedChannel, mux: StreamMux, frames: list[Frame] | None = None) -> None:
    try:
        while True:
            frame = channel.recv()
            if frames is not None:
                frames.append(frame)
            if frame.kind == "data" or frame.header.get("event") in ("tcp.window", "tcp.close"):
                mux.feed(frame)
    except (ChannelClosed, OSError):
        pass


@dataclass
class Pair:
    """Mux ``a`` (the 'host') and mux ``b`` (the 'guest') over one channel; ``connect``
    opens a relayed connection to a server on b's side and returns the client socket."""

    a: StreamMux
    b: StreamMux
    ca: FramedChannel
    cb: FramedChannel
    ids: Callable[[], int]

    def connect(self, port: int) -> socket.socket:
        front = socket.socket()
        front.bind(("127.0.0.1", 0))
        front.listen(1)
        client = socket.create_connection(front.getsockname())
        conn, _ = front.accept()
        front.close()
        sid = self.ids()
        self.a.attach(sid, conn, self.ca.send_raw, reading=False)
        self.b.attach(sid, socket.create_connection(("127.0.0.1", port)), self.cb.send_raw)
        self.a.start_reading(sid)
        client.settimeout(20)
        return client

    def settle(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.a.count() or self.b.count():
            assert time.monotonic() < deadline, (self.a.count(), self.b.count())
            time.sleep(0.01)


@pytest.fixture
def pair() -> Iterator[Pair]:
    sa, sb = socket.socketpair()
    ca, cb = FramedChannel(sa), FramedChannel(sb)
    a, b = StreamMux("test-a", window=1 << 20), StreamMux("test-b", window=1 << 20)
    for channel, mux in ((ca, a), (cb, b)):
        threading.Thread(target=_reader, args=(channel, mux), daemon=True).start()
    yield Pair(a, b, ca, cb, id_counter(1))
    a.close()
    b.close()
    ca.close()
    cb.close()


def _server(handler: Callable[[socket.socket], None]) -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return int(srv.getsockname()[1])


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def test_bytes_flow_both_ways_and_half_close_is_kept(pair: Pair) -> None:
    port = _server(_echo)
    client = pair.connect(port)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    sender = threading.Thread(target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
    sender.start()
    assert _read_all(client) == payload  # the echo server saw our EOF and closed: we see its EOF
    sender.join()
    client.close()
    pair.settle()


def test_the_guest_side_can_half_close_first(pair: Pair) -> None:
    got: list[bytes] = []

    def source_then_sink(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"banner\n")
            conn.shutdown(socket.SHUT_WR)
            got.append(_read_all(conn))

    client = pair.connect(_server(source_then_sink))
    assert _read_all(client) == b"banner\n"
    client.sendall(b"still talking after your EOF")
    client.shutdown(socket.SHUT_WR)
    wait_for(lambda: got, "the bytes sent after the peer's EOF", interval=0.01)
    assert got == [b"still talking after your EOF"]
    client.close()
    pair.settle()


def test_a_slow_reader_holds_at_most_a_window_and_stalls_nobody_else(pair: Pair) -> None:
    total = 96 * 1024 * 1024
    sent = [0]

    def flood(conn: socket.socket) -> None:
        block = os.urandom(1 << 16)
        with conn:
            while sent[0] < total:
                conn.sendall(block)
                sent[0] += len(block)

    slow = pair.connect(_server(flood))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    stalled_at = wait_stalled(lambda: sent[0], "the flood into a reader that reads nothing", settle=0.5)
    # The kernel's socket buffers (autotuned, up to tcp_wmem/tcp_rmem max on each of four
    # sockets) plus one window per mux -- not the whole flood.
    assert stalled_at < 40 * 1024 * 1024
    stream = next(iter(pair.a._streams.values()))
    assert stream.out_bytes <= pair.a.window
    # Meanwhile other streams run at full speed.
    echo_port = _server(_echo)
    for _ in range(3):
        other = pair.connect(echo_port)
        data = os.urandom(2 * 1024 * 1024)
        threading.Thread(target=lambda o=other, d=data: (o.sendall(d), o.shutdown(socket.SHUT_WR))).start()
        assert hashlib.sha256(_read_all(other)).digest() == hashlib.sha256(data).digest()
        other.close()
    assert sent[0] < stalled_at + 2 * 1024 * 1024
    received = 0
    while data := slow.recv(1 << 20):
        received += len(data)
    assert received == total
    slow.close()
    pair.settle()


def test_a_peer_abort_resets_the_local_connection(pair: Pair) -> None:
    accepted: list[socket.socket] = []
    client = pair.connect(_server(accepted.append))
    client.sendall(b"x")
    wait_for(lambda: accepted, "the server to accept", interval=0.01)
    sid = next(iter(pair.b._streams))
    pair.b.abort(sid, "testing")  # the guest side gives up: the host client sees a reset
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        for _ in range(50):
            if not client.recv(10):
                raise ConnectionResetError("EOF instead of reset")
    pair.settle()


def test_reset_all_drops_every_stream(pair: Pair) -> None:
    port = _server(lambda conn: time.sleep(5))
    clients = [pair.connect(port) for _ in range(3)]
    assert pair.a.count() == 3
    assert pair.a.reset_all("channel gone") == 3
    for client in clients:
        with pytest.raises(ConnectionResetError):
            client.recv(10)


def test_pending_stream_reads_writes_then_attaches(pair: Pair) -> None:
    """The egress proxy's shape: the guest side opens, the host reads a head, then splices."""
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(1)
    guest_client = socket.create_connection(front.getsockname())
    guest_conn, _ = front.accept()
    sid = 2
    pending = pair.a.pending(sid, pair.ca.send_raw)
    pair.b.attach(sid, guest_conn, pair.cb.send_raw)
    guest_client.sendall(b"HELLO\r\n\r\nearly-body")
    head = b""
    while b"\r\n\r\n" not in head:
        head += pending.recv(5, timeout=5)  # small reads: the rest stays queued in the mux
    leftover = head.split(b"\r\n\r\n", 1)[1]  # read past the head: handed back as a prefix
    pending.send(b"OK\n")
    upstream_port = _server(_echo)
    pending.attach(socket.create_connection(("127.0.0.1", upstream_port)), prefix=b"PREFIX:" + leftover)
    guest_client.sendall(b"+more")
    guest_client.shutdown(socket.SHUT_WR)
    guest_client.settimeout(10)
    assert _read_all(guest_client) == b"OK\nPREFIX:early-body+more"
    guest_client.close()
    pair.settle()


def test_pending_stream_timeouts_and_aborts(pair: Pair) -> None:
    pending = pair.a.pending(4, pair.ca.send_raw)
    with pytest.raises(TimeoutError):
        pending.recv(10, timeout=0.05)
    pending.abort("bye")
    with pytest.raises(StreamClosed):
        pending.recv(10, timeout=1)
    assert not pair.a.has(4)


class RawPeer:
    """A hand-written peer: frames we send go straight to ``mux``; its frames are collected."""

    def __init__(self) -> None:
        self.sa, sb = socket.socketpair()
        self.channel = FramedChannel(sb)
        self.mux = StreamMux("test-raw")  # the protocol's initial window only
        self.frames: list[Frame] = []
        threading.Thread(target=self._collect, daemon=True).start()
        threading.Thread(target=_reader, args=(FramedChannel(self.sa), self.mux), daemon=True).start()

    def _collect(self) -> None:
        try:
            while True:
                self.frames.append(self.channel.recv())
        except ChannelClosed:
            pass

    def attach(self, sid: int) -> socket.socket:
        front = socket.socket()
        front.bind(("127.0.0.1", 0))
        front.listen(1)
        client = socket.create_connection(front.getsockname())
        conn, _ = front.accept()
        self.mux.attach(sid, conn, FramedChannel(self.sa).send_raw)
        client.settimeout(5)
        return client

    def wait_close(self, sid: int) -> Frame:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for frame in self.frames:
                if frame.kind == "event" and frame.header["event"] == "tcp.close" and frame.header["stream"] == sid:
                    return frame
            time.sleep(0.01)
        raise AssertionError(f"no tcp.close for stream {sid}: {[f.header for f in self.frames]}")


def test_a_peer_sending_past_its_credit_gets_the_stream_reset() -> None:
    peer = RawPeer()
    client = peer.attach(1)
    chunk = b"y" * codec.CHUNK_SIZE
    for _ in range(TCP_WINDOW // codec.CHUNK_SIZE + 1):  # one chunk more than the initial window
        peer.channel.send_raw(codec.data(1, "tcp", chunk))
    close = peer.wait_close(1)
    assert "credit" in close.header["reason"]
    assert not peer.mux.has(1)
    with pytest.raises((ConnectionResetError, socket.timeout)):
        while client.recv(1 << 20):
            pass
    peer.mux.close()


def test_data_after_eof_resets_and_unknown_streams_are_ignored() -> None:
    peer = RawPeer()
    client = peer.attach(3)  # kept open: a closed client would end the stream before the late bytes
    peer.channel.send_raw(codec.data(99, "tcp", b"nobody"))  # unknown: dropped quietly
    peer.channel.send_raw(codec.event("tcp.window", stream=99, bytes=5))
    peer.channel.send_raw(codec.data(3, "tcp", b"", eof=True))
    peer.channel.send_raw(codec.data(3, "tcp", b"late"))
    assert "after EOF" in peer.wait_close(3).header["reason"]
    client.close()
    peer.mux.close()


def test_a_larger_window_is_granted_only_once_the_peer_knows_the_stream() -> None:
    ours, theirs = socket.socketpair()
    seen: list[Frame] = []

    def collect() -> None:
        channel = FramedChannel(theirs)
        try:
            while True:
                seen.append(channel.recv())
        except ChannelClosed:
            pass

    threading.Thread(target=collect, daemon=True).start()
    mux = StreamMux("test-grow", window=1 << 20)
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(1)
    client = socket.create_connection(front.getsockname())
    conn, _ = front.accept()
    send = FramedChannel(ours).send_raw
    mux.attach(5, conn, send, reading=False)
    # A marker on the same ordered channel: the mux sends what attaching queues in order, so
    # stream 7's grant (a stream the peer knows) comes after any frame attach(5) queued.
    marker_client = socket.create_connection(front.getsockname())
    marker_conn, _ = front.accept()
    mux.attach(7, marker_conn, send)
    grant = (1 << 20) - TCP_WINDOW
    wait_for(lambda: seen, "the marker stream's window grant", interval=0.01)
    # no grant for a stream the peer cannot know yet (tcp.connect in flight)
    assert [f.header for f in seen] == [{"kind": "event", "event": "tcp.window", "stream": 7, "bytes": grant}]
    mux.start_reading(5)
    wait_for(lambda: len(seen) == 2, "the window grant", interval=0.01)
    assert seen[1].header == {"kind": "event", "event": "tcp.window", "stream": 5, "bytes": grant}
    client.close()
    marker_client.close()
    mux.close()


@pytest.mark.parametrize("header", [
    {"kind": "data", "id": 0, "stream": "tcp"},
    {"kind": "data", "id": 1, "stream": "tcp", "eof": "yes"},
    {"kind": "event", "event": "tcp.window", "stream": 1},
    {"kind": "event", "event": "tcp.window", "stream": 1, "bytes": 0},
    {"kind": "event", "event": "tcp.window", "stream": 0, "bytes": 10},
    {"kind": "event", "event": "tcp.close", "stream": "1"},
    {"kind": "event", "event": "tcp.close", "stream": 1, "reason": 5},
    {"kind": "event", "event": "tcp.open", "stream": 2, "port": 0},
    {"kind": "event", "event": "tcp.open", "stream": 2, "port": 3128, "peer": None},
    # the other credit events and a request's window (docs/protocol.md, "Flow control")
    {"kind": "event", "event": "data.window", "id": 1},
    {"kind": "event", "event": "data.window", "id": 0, "bytes": 5},
    {"kind": "event", "event": "proc.window", "pid": 7, "bytes": (1 << 32) + 1},
    {"kind": "event", "event": "proc.window", "pid": "7", "bytes": 5},
    {"kind": "request", "id": 1, "op": "x", "window": 0},
    {"kind": "request", "id": 1, "op": "x", "window": True},
])
def test_stream_frames_with_bad_fields_are_protocol_errors(header: dict) -> None:
    with pytest.raises(ProtocolError):
        codec.encode(header)
    raw = codec.json.dumps(header).encode()
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(codec.PREFIX.pack(len(raw), 0) + raw)


def test_stream_frames_round_trip() -> None:
    frames = [codec.data(1, "tcp", b"abc", eof=True), codec.event("tcp.window", stream=1, bytes=65536),
              codec.event("tcp.close", stream=3, reason="gone"),
              codec.event("tcp.open", stream=2, port=3128, peer="127.0.0.1:5555")]
    decoded = FrameDecoder().feed(b"".join(frames))
    assert [f.header.get("event", f.kind) for f in decoded] == ["data", "tcp.window", "tcp.close", "tcp.open"]
    assert decoded[0].payload == b"abc" and decoded[0].header["eof"] is True
