"""FramedChannel over real sockets and pipes: concurrency, EOF, close, handshake."""

from __future__ import annotations

import array
import os
import socket
import threading

import pytest
from waiting import wait_for

from mvm.protocol import codec
from mvm.protocol.channel import ChannelClosed, FramedChannel
from mvm.protocol.codec import PREFIX, ProtocolError


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    a, b = FramedChannel(left), FramedChannel(right)
    yield a, b
    a.close()
    b.close()


def test_concurrent_senders_never_interleave_frames(pair) -> None:
    sender, receiver = pair
    threads, per_thread = 8, 150
    sizes = [0, 1, 100, 70_000, codec.CHUNK_SIZE]  # some bigger than a socket buffer

    def send_all(thread: int) -> None:
        for n in range(per_thread):
            payload = bytes([thread]) * sizes[n % len(sizes)]
            sender.send_raw(codec.data(n, f"t{thread}", payload))

    workers = [threading.Thread(target=send_all, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    seen: dict[str, list[int]] = {}
    for _ in range(threads * per_thread):
        frame = receiver.recv()
        stream = frame.header["stream"]
        thread = int(stream[1:])
        assert frame.payload == bytes([thread]) * sizes[frame.id % len(sizes)]  # type: ignore[operator]
        seen.setdefault(stream, []).append(frame.id)  # type: ignore[arg-type]
    for worker in workers:
        worker.join()
    assert seen == {f"t{t}": list(range(per_thread)) for t in range(threads)}, "each sender's order is kept"


def test_handshake_from_both_sides_at_once_exchanges_hellos(pair) -> None:
    a, b = pair
    result: dict[str, dict] = {}
    thread = threading.Thread(target=lambda: result.update(b=b.handshake("agent", pid=7)))
    thread.start()
    result["a"] = a.handshake("supervisor")
    thread.join(5)
    assert result["a"]["role"] == "agent" and result["a"]["pid"] == 7
    assert result["b"]["role"] == "supervisor"


def test_handshake_refuses_another_major_version(pair) -> None:
    a, b = pair
    b.send({"kind": "hello", "protocol": "mvm", "version": codec.PROTOCOL_VERSION + 1, "role": "future"})
    with pytest.raises(ProtocolError):
        a.handshake("supervisor")


def test_the_peer_closing_is_ChannelClosed(pair) -> None:
    a, b = pair
    b.send_raw(codec.request(1, "ping"))
    b.close()
    assert a.recv().header["op"] == "ping"
    with pytest.raises(ChannelClosed, match="peer closed"):
        a.recv()


def test_the_peer_closing_mid_frame_is_ChannelClosed(pair) -> None:
    a, b = pair
    frame = codec.request(1, "ping")
    b._sock.sendall(frame[:-3])  # type: ignore[union-attr]
    b.close()
    with pytest.raises(ChannelClosed, match="mid-frame"):
        a.recv()


def test_garbage_from_the_peer_is_a_protocol_error(pair) -> None:
    a, b = pair
    b._sock.sendall(PREFIX.pack(5, 0) + b"hello")  # type: ignore[union-attr]
    with pytest.raises(ProtocolError):
        a.recv()


def _sleeping(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked in the kernel (state S), e.g. in a ``recv``."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "S"


def test_close_wakes_a_blocked_receiver(pair) -> None:
    a, _ = pair
    outcome: list[BaseException] = []

    def receive() -> None:
        try:
            a.recv()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=receive)
    thread.start()
    wait_for(lambda: _sleeping(thread), "the receiver to block in recv")
    a.close()
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome[0], ChannelClosed)


def test_sending_on_a_closed_channel_is_ChannelClosed(pair) -> None:
    a, _ = pair
    a.close()
    with pytest.raises(ChannelClosed):
        a.send_raw(codec.request(1, "ping"))


def test_sending_to_a_vanished_peer_is_ChannelClosed(pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises(ChannelClosed):
        for _ in range(100):
            a.send_raw(codec.data(1, "stdout", b"x" * codec.CHUNK_SIZE))


def test_raw_file_descriptors_work_like_a_socket() -> None:
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    try:
        a = FramedChannel(read_fd=down_r, write_fd=up_w)
        b = FramedChannel(read_fd=up_r, write_fd=down_w)
        payload = os.urandom(3 * codec.CHUNK_SIZE)  # larger than a pipe: the reader must run concurrently
        thread = threading.Thread(target=lambda: a.send(
            {"kind": "data", "id": 1, "stream": "stdout"}, payload))
        thread.start()
        frame = b.recv()
        thread.join(5)
        assert frame.payload == payload
        b.send_raw(codec.response_ok(1, {"ok": True}))
        assert a.recv().header["result"] == {"ok": True}
        os.close(down_w)
        with pytest.raises(ChannelClosed):
            a.recv()
    finally:
        for fd in (up_r, up_w, down_r):
            try:
                os.close(fd)
            except OSError:
                pass


def test_a_channel_needs_a_transport() -> None:
    with pytest.raises(ValueError):
        FramedChannel(read_fd=0)


@pytest.mark.parametrize("transport", ["socket", "fds"])
def test_big_payloads_sent_in_parts_and_read_in_place_arrive_intact_between_small_frames(transport: str) -> None:
    if transport == "socket":
        left, right = socket.socketpair()
        a, b = FramedChannel(left), FramedChannel(right)
    else:
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        a, b = FramedChannel(read_fd=down_r, write_fd=up_w), FramedChannel(read_fd=up_r, write_fd=down_w)
    tcp = [os.urandom(size) for size in (codec.DIRECT_MIN, 3 * codec.DIRECT_MIN + 7, codec.CHUNK_SIZE)]
    file_chunk = os.urandom(codec.CHUNK_SIZE + 1)

    def send() -> None:
        for n, payload in enumerate(tcp, start=1):
            a.send_raw(codec.data_parts(n, codec.TCP_STREAM, payload))  # gathered: header and payload apart
            a.send_raw(codec.event("tcp.window", stream=n, bytes=1))
        a.send_raw(codec.response_ok(9, {"size": len(file_chunk)}, file_chunk))

    thread = threading.Thread(target=send)
    thread.start()
    try:
        for n, payload in enumerate(tcp, start=1):
            frame = b.recv()
            assert (frame.kind, frame.id, frame.payload) == ("data", n, payload)
            assert b.recv().header["event"] == "tcp.window"
        frame = b.recv()
        assert frame.payload == file_chunk
        assert type(frame.payload) is bytes, "payloads other than TCP stream bytes stay bytes"
    finally:
        thread.join(10)
        a.close()
        b.close()


# ---- descriptors (SCM_RIGHTS): the namespace backend's agent handing sockets over ---------------


def _fd_pair() -> tuple[FramedChannel, FramedChannel]:
    left, right = socket.socketpair()
    return FramedChannel(left), FramedChannel(right, receive_fds=True)


def _send_with_rights(sock: socket.socket, frame: bytes, fds: list[int]) -> None:
    """A peer that does not go through ``send_raw`` (it may lie about ``fds``)."""
    sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def test_descriptors_travel_with_the_frame_that_announces_them_in_order() -> None:
    sender, receiver = _fd_pair()
    read_end, write_end = os.pipe()
    big = os.urandom(3 * codec.DIRECT_MIN)  # read in place, around the descriptor frames

    def send() -> None:
        sender.send_raw(codec.event("plain"))
        sender.send_raw(codec.event("tcp.open", stream=2, port=3128, fds=1), [read_end])
        sender.send_raw(codec.data_parts(1, codec.TCP_STREAM, big))
        sender.send_raw(codec.response_ok(7, {"handoff": True}, fds=1), [write_end])

    thread = threading.Thread(target=send)
    thread.start()
    try:
        frames = [receiver.recv() for _ in range(4)]
        thread.join(10)
        assert [f.fds for f in frames[::2]] == [(), ()]
        assert frames[2].payload == big
        assert len(frames[1].fds) == 1 and len(frames[3].fds) == 1
        os.close(read_end)
        os.close(write_end)  # ours are gone: the received copies are the pipe now
        os.write(frames[3].fds[0], b"through the pipe")
        assert os.read(frames[1].fds[0], 100) == b"through the pipe"
        assert os.get_inheritable(frames[1].fds[0]) is False
    finally:
        for frame in frames:
            for fd in frame.fds:
                os.close(fd)
        sender.close()
        receiver.close()


def test_a_channel_that_takes_no_descriptors_lets_the_kernel_close_them() -> None:
    left, right = socket.socketpair()
    sender, receiver = FramedChannel(left), FramedChannel(right)  # (the agent's side; the VM link)
    read_end, write_end = os.pipe()
    _send_with_rights(left, codec.event("proc.exit", pid=1), [write_end])
    os.close(write_end)
    assert receiver.recv().fds == ()
    assert os.read(read_end, 10) == b""  # no writer is left anywhere: the one in flight was closed
    os.close(read_end)
    sender.send_raw(codec.event("tcp.open", stream=2, port=3128, fds=1), [0])
    with pytest.raises(ProtocolError):  # it cannot have what the frame says it carries
        receiver.recv()
    sender.close()
    receiver.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("lie", ["unannounced", "announced, never sent", "two at once"])
def test_descriptors_that_do_not_match_the_frames_are_a_protocol_error_and_closed(lie: str) -> None:
    sender, receiver = _fd_pair()
    left = sender._sock
    assert left is not None
    read_end, write_end = os.pipe()
    before = _fd_count()
    if lie == "unannounced":
        _send_with_rights(left, codec.event("proc.exit", pid=1), [write_end])
    elif lie == "announced, never sent":
        left.sendall(codec.response_ok(1, {}, fds=1))
    else:
        _send_with_rights(left, codec.response_ok(1, {}, fds=1), [write_end, read_end])
    with pytest.raises(ProtocolError):
        receiver.recv()
    receiver.close()
    assert _fd_count() <= before  # whatever arrived was closed
    sender.close()
    os.close(read_end)
    os.close(write_end)


def test_only_a_unix_socket_can_send_descriptors() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    tcp = FramedChannel(socket.create_connection(listener.getsockname()))
    assert not tcp.passes_fds
    with pytest.raises(ValueError):
        tcp.send_raw(codec.event("tcp.open", stream=2, port=1, fds=1), [0])
    tcp.close()
    listener.close()
    with pytest.raises(ProtocolError):
        codec.encode({"kind": "event", "event": "x", "fds": codec.MAX_FDS + 1})
