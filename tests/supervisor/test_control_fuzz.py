"""Bad input on a live supervisor's control socket: hypothesis-generated requests
(every op, arguments of the wrong types) and mutated frames (flipped bytes, lying
lengths, truncated and stalled streams, frames of the wrong kind).

Whatever arrives: every request gets a typed answer (never ``Internal``, which is
a bug), a broken frame costs only its own connection, the supervisor keeps serving
everyone else and its threads and memory stay bounded. Counts are fixed
(``max_examples``) so the module stays within ~30 s on a namespace sandbox.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from waiting import wait_for

import mvm
from mvm import errors
from mvm.protocol import codec
from mvm.protocol.channel import ChannelClosed, FramedChannel
from mvm.protocol.codec import MAX_HEADER, MAX_PAYLOAD, ProtocolError
from mvm.supervisor.session import MAX_INFLIGHT, MAX_SESSIONS
from mvm.supervisor.state import CONTROL_SOCKET

#: Every typed error a supervisor may answer with; ``Internal`` is a bug.
TYPED = {cls.wire_type for cls in vars(errors).values()
         if isinstance(cls, type) and issubclass(cls, errors.MvmError)} - {"Internal"}
#: Ops that change the sandbox's life are driven by the lifecycle tests, not fuzzed here.
LIFECYCLE = {"sandbox.destroy", "sandbox.stop", "sandbox.pause", "sandbox.snapshot", "sandbox.start",
             "sandbox.resume"}
OPS = ["ping", "sandbox.describe", "sandbox.logs", "exec.run", "proc.start", "proc.attach", "proc.wait",
       "proc.info", "fs.read", "fs.write", "fs.write_begin", "fs.write_chunk", "fs.write_end", "fs.list",
       "fs.stat", "fs.mkdir", "fs.remove", "fs.move", "proc.stdin", "proc.signal", "proc.list", "port.forward",
       "port.list", "port.close", "network.update", "no.such.op", "", "sandbox.describe\x00", "x" * 300]
#: (Not ``follow``: a log follow is answered only when cancelled, which is not a hang.)
ARG_NAMES = ["argv", "env", "cwd", "pid", "stdin", "timeout_seconds", "max_output_bytes", "auto_resume", "replay",
             "tail", "since", "redact", "path", "dest", "mode", "offset", "length", "handle", "data", "eof",
             "signal", "group", "recursive", "parents", "make_parents", "host", "host_port", "guest_port", "detach",
             "allow_wildcard", "allow", "allow_wildcards", "id", "name", "secret_names", "payload"]
#: Strings that are harmless as commands and paths (the fuzzer must not run `yes` forever
#: or remove the sandbox's /bin): nonsense, wrong shapes, and the fuzz scratch folder.
STRINGS = st.sampled_from(["", "x", "true", "/tmp/fuzz", "/tmp/fuzz/a", "relative/path", "/nonexistent/x",
                           "\x00", "a\x00b", "/tmp/" + "l" * 5000, "..", "é", "\ud800", "KILL", "TERM", "0",
                           "-1", "1e308", "allow", "deny", "127.0.0.1", "host.mvm.internal:1", "*", "stdout"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | STRINGS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4),
    max_leaves=8,
)


class Raw:
    """A control-socket client that sends whatever it is given."""

    def __init__(self, path: Path, timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)  # an answer slower than this is a hang
        self.sock.connect(str(path))
        self.channel = FramedChannel(self.sock)
        self.channel.handshake("client")

    def answer(self, ident: int) -> dict[str, Any]:
        """Frames until the response to ``ident`` (its data frames skipped)."""
        while True:
            frame = self.channel.recv()
            if frame.kind == "response" and frame.id == ident:
                return frame.header

    def call(self, op: str, args: Any = None, payload: bytes = b"", ident: int = 1) -> dict[str, Any]:
        header = {"kind": "request", "id": ident, "op": op, "args": {} if args is None else args}
        self.sock.sendall(_frame(header, payload))
        return self.answer(ident)

    def closed_by_peer(self) -> bool:
        """True once the supervisor closed this connection (EOF or reset), within the timeout."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.channel.close()


def _frame(header: Any, payload: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return struct.pack(">II", len(raw), len(payload)) + raw + payload


@pytest.fixture(scope="module")
def box() -> Iterator[mvm.Sandbox]:
    with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="15m") as sandbox:
        sandbox.files.write("/tmp/fuzz/a", "scratch")
        yield sandbox


@pytest.fixture(scope="module")
def control(box: mvm.Sandbox) -> Path:
    return Path(box._directory) / CONTROL_SOCKET


def _supervisor_pid(box: mvm.Sandbox) -> int:
    return int(box.describe().details["supervisor_pid"])


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _still_serving(control: Path) -> None:
    client = Raw(control)
    try:
        answer = client.call("sandbox.describe")
        assert answer["ok"] and answer["result"]["state"] == "running", answer
    finally:
        client.close()


# ---- well-framed requests with arguments of every wrong shape -------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(op=st.sampled_from(OPS), args=st.dictionaries(st.sampled_from(ARG_NAMES), JSON, max_size=5),
       payload=st.binary(max_size=64))
def test_every_request_gets_a_typed_answer(control: Path, op: str, args: dict[str, Any], payload: bytes) -> None:
    client = Raw(control)
    try:
        answer = client.call(op, args, payload)
        if not answer["ok"]:
            assert answer["error"]["type"] in TYPED, answer["error"]
            assert answer["error"]["message"]
        assert client.call("ping", ident=2)["ok"]  # the same connection goes on
    finally:
        client.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=JSON, ident=st.integers(min_value=0, max_value=2**53))
def test_arguments_that_are_not_an_object_cost_only_the_connection(control: Path, args: Any, ident: int) -> None:
    client = Raw(control)
    try:
        client.sock.sendall(_frame({"kind": "request", "id": ident, "op": "ping", "args": args}))
        if isinstance(args, dict):
            assert client.answer(ident)["ok"]
        else:
            assert client.closed_by_peer()  # not a request at all: a protocol error ends the connection
    finally:
        client.close()


# ---- broken frames ---------------------------------------------------------------------------------


def _valid_request(ident: int = 7) -> bytes:
    return codec.request(ident, "fs.stat", {"path": "/tmp/fuzz/a"})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_frames_end_the_connection_or_get_an_answer(control: Path, data: st.DataObject) -> None:
    frame = bytearray(_valid_request())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] = data.draw(st.integers(0, 255))
    client = Raw(control, timeout=15)
    try:
        header_len, payload_len = struct.unpack(">II", frame[:8])
        complete = header_len <= MAX_HEADER and payload_len <= MAX_PAYLOAD and \
            len(frame) >= 8 + header_len + payload_len
        try:
            client.sock.sendall(bytes(frame))
            if not complete:  # the rest never comes: the connection must not take anyone else down
                client.sock.shutdown(socket.SHUT_WR)
            while True:
                got = client.channel.recv()
                if got.kind == "response":
                    if not got.header["ok"]:
                        assert got.header["error"]["type"] in TYPED, got.header
                    break
        except (ChannelClosed, ProtocolError, ConnectionResetError, BrokenPipeError):
            pass  # closed by the supervisor: the right answer to a frame it cannot read
    finally:
        client.close()


@pytest.mark.parametrize("name, raw", [
    ("header length beyond MAX_HEADER", struct.pack(">II", MAX_HEADER + 1, 0)),
    ("payload length beyond MAX_PAYLOAD", struct.pack(">II", 20, MAX_PAYLOAD + 1) + b'{"kind":"request"}  '),
    ("both lengths at 4 GiB", b"\xff" * 8),
    ("header not JSON", struct.pack(">II", 5, 0) + b"{{{{{"),
    ("header not UTF-8", struct.pack(">II", 4, 0) + b"\xff\xfe\xfd\xfc"),
    ("header a JSON list", _frame([1, 2, 3])),
    ("unknown kind", _frame({"kind": "bogus", "id": 1})),
    ("a second hello", codec.hello("client")),
    ("request without an id", _frame({"kind": "request", "op": "ping"})),
    ("request with a string id", _frame({"kind": "request", "id": "1", "op": "ping"})),
    ("request with a negative id", _frame({"kind": "request", "id": -1, "op": "ping"})),
    ("request with a non-string op", _frame({"kind": "request", "id": 1, "op": 5})),
    ("a response sent to the supervisor", _frame({"kind": "response", "id": 1, "ok": True})),
    ("a data frame for no request", _frame({"kind": "data", "id": 99, "stream": "stdin"}, b"x" * 100)),
    ("an event", _frame({"kind": "event", "event": "tcp.close", "stream": 1})),
    ("cancel of nothing", _frame({"kind": "cancel", "id": 12345})),
])
def test_each_kind_of_broken_frame(control: Path, name: str, raw: bytes) -> None:
    client = Raw(control, timeout=15)
    try:
        try:
            client.sock.sendall(raw)
            client.sock.sendall(_valid_request(ident=8))  # answered only if the connection survived
            while True:
                frame = client.channel.recv()
                if frame.kind == "response":
                    assert frame.id == 8 and frame.header["ok"], (name, frame.header)
                    break
        except (ChannelClosed, ProtocolError, ConnectionResetError, BrokenPipeError):
            pass  # it was closed: the supervisor could not trust the rest of the stream
    finally:
        client.close()
    _still_serving(control)


def test_stalled_and_flooding_clients_cost_bounded_threads_and_memory(box: mvm.Sandbox, control: Path) -> None:
    pid = _supervisor_pid(box)
    _still_serving(control)
    threads, rss = _threads(pid), _rss_kib(pid)
    stalled = []
    for n in range(40):  # 40 clients each stop mid-frame (a header announced, part of it sent) and wait
        client = Raw(control)
        client.sock.sendall(struct.pack(">II", 1000, MAX_PAYLOAD) + b'{"kind":"request","id":1,' + b" " * n)
        stalled.append(client)
    _still_serving(control)  # everyone else is served meanwhile
    flood = Raw(control)  # one client asking for endless log follows, reading nothing
    flood.sock.settimeout(5)
    try:
        for ident in range(1, 2001):
            flood.sock.sendall(codec.request(ident, "sandbox.logs", {"follow": True, "tail": 1}))
    except TimeoutError:
        pass  # the supervisor stopped reading it: back-pressure
    _still_serving(control)
    answers = []
    flood.sock.settimeout(30)
    while len(answers) < 10:  # the requests past the limit are refused, not queued on threads
        frame = flood.channel.recv()
        if frame.kind == "response":
            answers.append(frame.header)
    assert all(not a["ok"] and a["error"]["type"] == "TooLarge" for a in answers), answers
    # a thread per stalled client and at most MAX_INFLIGHT for the flood: bounded
    assert _threads(pid) <= threads + 40 + MAX_INFLIGHT + 8, (threads, _threads(pid))
    assert _rss_kib(pid) < rss + 64 * 1024, (rss, _rss_kib(pid))
    for client in [*stalled, flood]:
        client.close()
    wait_for(lambda: _threads(pid) <= threads + 8, "the supervisor's threads to end with their clients")
    _still_serving(control)


def test_more_connections_than_served_are_closed_not_queued(control: Path) -> None:
    held = [Raw(control) for _ in range(MAX_SESSIONS - 2)]  # (the fixture's own SDK connection is one)
    try:
        with pytest.raises((ChannelClosed, ConnectionResetError, BrokenPipeError, ProtocolError)):
            for _ in range(4):
                held.append(Raw(control, timeout=10))
    finally:
        for client in held:
            client.close()
    _still_serving(control)
