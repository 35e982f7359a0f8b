"""A hostile guest: the supervisor's agent link (``AgentLink``, as the supervisor uses it)
facing a peer that is not the real agent but lies -- malformed and huge frames, lengths
it never delivers, well-framed events missing their fields, floods of frames nobody
asked for. Whatever it does: every call ends with a typed error in bounded time, the
link reports itself lost (the sandbox then shows ``error``), memory stays bounded.
(The guest is the untrusted side: root in a VM can replace the agent.)
"""

from __future__ import annotations

import array
import json
import os
import resource
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from waiting import wait_for

from mvm import errors
from mvm.protocol import codec
from mvm.protocol.codec import MAX_PAYLOAD
from mvm.supervisor.agent_link import AgentLink


class Hostile:
    """The guest end of a socketpair, scripted by the test; the link is the host end."""

    def __init__(self, *, receive_fds: bool = False) -> None:
        self.host, self.guest = socket.socketpair()
        self.events: list[codec.Frame] = []
        self.lost: list[str] = []
        self.link = AgentLink(on_event=self._on_event, on_lost=self.lost.append, receive_fds=receive_fds)

    def _on_event(self, frame: codec.Frame, generation: int) -> None:
        # as the supervisor's handler does: an event's fields are used as the protocol says
        self.events.append(frame)
        int(frame.header["pid"])

    def attach(self, **hello_fields: object) -> None:
        def hello() -> None:
            self.guest.sendall(codec.hello("agent", pid=1, **hello_fields))

        threading.Thread(target=hello, daemon=True).start()
        self.link.attach(self.host, timeout=10)
        codec.check_hello(_read_frame(self.guest))  # the supervisor's hello

    def request(self) -> dict:
        """The header of the next request the supervisor sent."""
        return _read_frame(self.guest).header

    def close(self) -> None:
        self.link.detach()
        self.guest.close()


def _read_frame(sock: socket.socket) -> codec.Frame:
    decoder = codec.FrameDecoder()
    while True:
        frames = decoder.feed(sock.recv(65536))
        if frames:
            return frames[0]


def _raw(header: object, payload: bytes = b"") -> bytes:
    data = json.dumps(header).encode()
    return struct.pack(">II", len(data), len(payload)) + data + payload


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    peer = Hostile()
    peer.attach()
    yield peer
    peer.close()


def _call_in_background(link: AgentLink, timeout: float = 30) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(link.call("fs.stat", {"path": "/"}, timeout=timeout))
        except errors.MvmError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, outcome


SCRIPTS: dict[str, Callable[[Hostile, int], None]] = {
    "an event without its pid": lambda h, i: h.guest.sendall(codec.event("proc.output")),
    "a pid that is not a number": lambda h, i: h.guest.sendall(codec.event("proc.exit", pid="x")),
    "a header announcing 4 GiB": lambda h, i: h.guest.sendall(b"\xff\xff\xff\xff\x00\x00\x00\x00"),
    "a payload beyond MAX_PAYLOAD": lambda h, i: h.guest.sendall(struct.pack(">II", 2, MAX_PAYLOAD + 1) + b"{}"),
    "a header that is not JSON": lambda h, i: h.guest.sendall(struct.pack(">II", 3, 0) + b"{{{"),
    "an unknown frame kind": lambda h, i: h.guest.sendall(_raw({"kind": "bogus", "id": i})),
    "a response without ok": lambda h, i: h.guest.sendall(_raw({"kind": "response", "id": "nope"})),
    "a TCP event with a bad stream": lambda h, i: h.guest.sendall(_raw({"kind": "event", "event": "tcp.window",
                                                                         "stream": "x", "bytes": -5})),
    "the channel closed mid-frame": lambda h, i: (h.guest.sendall(struct.pack(">II", 100, 0) + b"{\"ki"),
                                                  h.guest.shutdown(socket.SHUT_WR)),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_lie_loses_the_link_and_fails_the_call_at_once(hostile: Hostile, name: str) -> None:
    thread, outcome = _call_in_background(hostile.link)
    ident = hostile.request()["id"]
    SCRIPTS[name](hostile, ident)
    thread.join(10)  # at once: not after the call's 30 s timeout
    assert not thread.is_alive(), name
    assert isinstance(outcome[0], errors.SandboxError), outcome
    wait_for(lambda: hostile.lost, "the link reporting itself lost", timeout=10)
    assert not hostile.link.attached
    with pytest.raises(errors.InvalidState):  # nothing is sent to it any more
        hostile.link.call("ping")


def test_stalling_mid_frame_costs_only_the_call_timeout(hostile: Hostile) -> None:
    thread, outcome = _call_in_background(hostile.link, timeout=2)
    hostile.request()
    hostile.guest.sendall(struct.pack(">II", 1000, 0) + b'{"kind":"response"')  # ...and nothing more
    thread.join(15)
    assert not thread.is_alive()
    assert isinstance(outcome[0], errors.SandboxError) and "within 2" in outcome[0].message, outcome


def test_a_flood_of_frames_nobody_asked_for_is_dropped_in_bounded_memory(hostile: Hostile) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    blob = b"z" * MAX_PAYLOAD
    stop = threading.Event()

    def flood() -> None:
        n = 0
        while not stop.is_set() and n < 64:  # 512 MiB of unsolicited data and responses
            n += 1
            try:
                hostile.guest.sendall(codec.encode({"kind": "data", "id": n, "stream": "stdout"}, blob))
                hostile.guest.sendall(codec.encode({"kind": "response", "id": 10**9 + n, "ok": True}, blob))
            except OSError:
                return

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    flooder.join(120)
    stop.set()
    assert not flooder.is_alive(), "the link stopped reading"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"the link kept {grown_mib:.0f} MiB of frames nobody asked for"
    # ... and it still answers what was asked
    thread, outcome = _call_in_background(hostile.link)
    ident = hostile.request()["id"]
    hostile.guest.sendall(codec.response_ok(ident, {"type": "dir"}))
    thread.join(10)
    assert outcome == [({"type": "dir"}, b"")]
    assert not hostile.lost


def test_an_agent_that_never_says_hello_fails_attach_in_bounded_time() -> None:
    host, guest = socket.socketpair()
    link = AgentLink(on_event=lambda frame, generation: None, on_lost=lambda reason: None)
    try:
        with pytest.raises(errors.SandboxError, match="did not answer hello"):
            link.attach(host, timeout=2)
    finally:
        guest.close()


# ---- descriptors: a link that takes the sockets a namespace agent hands over ----------------------


@pytest.fixture
def handing() -> Iterator[Hostile]:
    peer = Hostile(receive_fds=True)
    peer.attach(fd_passing=True)
    yield peer
    peer.close()


def _with_rights(sock: socket.socket, frame: bytes, fd: int) -> None:
    sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])


def _wait_closed_elsewhere(read_end: int) -> None:
    """Until the pipe's only other write end (the one sent to the link) is closed: EOF."""
    assert os.read(read_end, 10) == b""
    os.close(read_end)


def test_only_a_link_that_takes_descriptors_hands_off_and_only_to_an_agent_that_offers(handing: Hostile) -> None:
    assert handing.link.hands_off_sockets
    plain = Hostile()
    plain.attach(fd_passing=True)  # the VM link: whatever the guest claims
    assert not plain.link.hands_off_sockets
    plain.close()
    quiet = Hostile(receive_fds=True)
    quiet.attach()  # an agent that does not offer
    assert not quiet.link.hands_off_sockets
    quiet.close()


def test_a_descriptor_on_a_frame_that_cannot_carry_one_is_closed_and_loses_the_link(handing: Hostile) -> None:
    read_end, write_end = os.pipe()
    _with_rights(handing.guest, codec.event("proc.exit", pid=1, fds=1), write_end)
    os.close(write_end)
    wait_for(lambda: handing.lost, "the link reporting itself lost", timeout=10)
    _wait_closed_elsewhere(read_end)
    assert not handing.events


def test_an_answer_without_the_socket_asked_for_is_a_typed_error(handing: Hostile) -> None:
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(handing.link.call_for_fd("tcp.connect", {"stream": 1, "port": 1, "handoff": True}))
        except errors.MvmError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    handing.guest.sendall(codec.response_ok(handing.request()["id"], {"stream": 1, "handoff": True}))
    thread.join(10)
    assert isinstance(outcome[0], errors.SandboxError) and "without the connection" in outcome[0].message
    assert handing.link.attached and not handing.lost


def test_a_descriptor_nobody_waits_for_any_more_is_closed(handing: Hostile) -> None:
    with pytest.raises(errors.SandboxError, match="within"):
        handing.link.call_for_fd("tcp.connect", {"stream": 1, "port": 1, "handoff": True}, timeout=0.2)
    ident = handing.request()["id"]
    read_end, write_end = os.pipe()
    _with_rights(handing.guest, codec.response_ok(ident, {"handoff": True}, fds=1), write_end)
    os.close(write_end)
    _wait_closed_elsewhere(read_end)  # the late answer's descriptor
    assert handing.link.attached and not handing.lost
