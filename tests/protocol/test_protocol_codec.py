"""The frame codec: round trips, limits, and hostile input (unit and property tests)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm.protocol import codec
from mvm.protocol.codec import MAX_HEADER, MAX_PAYLOAD, PREFIX, Frame, FrameDecoder, ProtocolError

# -- strategies -----------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False)
                | st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
extras = st.dictionaries(st.text(max_size=10).filter(lambda k: k not in {"kind", "id", "ok", "error", "result",
                                                                            "op", "args", "stream", "event",
                                                                            "protocol", "version", "role",
                                                                            "eof", "window", "fds"}),
                         json_values, max_size=4)
ids = st.integers(0, 2**53)
objects = st.dictionaries(st.text(max_size=10), json_values, max_size=4)


@st.composite
def headers(draw: Any) -> dict[str, Any]:
    """A valid header of any kind, with arbitrary extra fields."""
    kind = draw(st.sampled_from(sorted(codec.KINDS)))
    base: dict[str, Any] = {"kind": kind}
    if kind == "hello":
        base.update(protocol="mvm", version=draw(st.integers(0, 10)), role=draw(st.text(max_size=10)))
    elif kind == "event":  # (tcp.* and credit events have required fields, tested below)
        base["event"] = draw(st.text(max_size=20).filter(
            lambda name: name not in codec.TCP_EVENTS and name not in codec.WINDOW_EVENTS))
    else:
        base["id"] = draw(ids)
        if kind == "request":
            base.update(op=draw(st.text(max_size=20)), args=draw(objects))
            if draw(st.booleans()):
                base["window"] = draw(st.integers(1, codec.MAX_GRANT))
        elif kind == "response":
            if draw(st.booleans()):
                base.update(ok=True, result=draw(objects))
            else:
                base.update(ok=False, error={"type": draw(st.text(max_size=10)), "message": draw(st.text())})
        elif kind == "data":
            base["stream"] = draw(st.text(max_size=10).filter(lambda name: name != codec.TCP_STREAM))
    return {**draw(extras), **base}


frames = st.tuples(headers(), st.binary(max_size=2048))


def raw_frame(header_bytes: bytes, payload: bytes = b"") -> bytes:
    """A frame with an arbitrary header body (not necessarily valid)."""
    return PREFIX.pack(len(header_bytes), len(payload)) + header_bytes + payload


def decode_all(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    result = decoder.feed(data)
    assert decoder.buffered == 0
    return result


# -- unit tests -------------------------------------------------------------------------


def test_every_constructor_produces_a_frame_that_decodes_back() -> None:
    encoded = [
        codec.hello("supervisor", extra=1),
        codec.request(1, "fs.read", {"path": "/etc/hostname"}),
        codec.response_ok(1, {"size": 3}, b"abc"),
        codec.response_error(2, "FileNotFound", "no such file", path="/x"),
        codec.data(3, "stdout", b"out"),
        codec.event("proc.exit", pid=5, exit_code=0),
        codec.cancel(4),
    ]
    decoded = decode_all(b"".join(encoded))
    assert [f.kind for f in decoded] == ["hello", "request", "response", "response", "data", "event", "cancel"]
    assert decoded[0].header["role"] == "supervisor" and decoded[0].header["version"] == codec.PROTOCOL_VERSION
    assert decoded[2].payload == b"abc" and decoded[2].id == 1
    assert decoded[3].header["error"] == {"type": "FileNotFound", "message": "no such file", "path": "/x"}
    assert decoded[5].id is None


def test_payload_bytes_travel_unencoded() -> None:
    payload = bytes(range(256))
    encoded = codec.data(1, "stdout", payload)
    assert encoded.endswith(payload)
    assert len(encoded) == PREFIX.size + len(json.dumps({"kind": "data", "id": 1, "stream": "stdout"},
                                                        separators=(",", ":"))) + len(payload)


def test_encode_refuses_frames_over_the_limits() -> None:
    with pytest.raises(ProtocolError, match="MAX_HEADER"):
        codec.event("big", blob="x" * MAX_HEADER)
    with pytest.raises(ProtocolError, match="MAX_PAYLOAD"):
        codec.data(1, "stdout", b"x" * (MAX_PAYLOAD + 1))
    assert decode_all(codec.data(1, "stdout", b"x" * MAX_PAYLOAD))[0].payload == b"x" * MAX_PAYLOAD


def test_encode_refuses_headers_that_are_not_json() -> None:
    with pytest.raises(ProtocolError):
        codec.event("x", value={1, 2})
    with pytest.raises(ProtocolError):
        codec.event("x", value=b"bytes")


def test_strings_that_are_not_valid_unicode_survive_a_round_trip() -> None:
    name = "caf\udce9.txt"  # a non-UTF-8 file name as os.listdir returns it (surrogateescape)
    frame = decode_all(codec.response_ok(1, {"name": name}))[0]
    assert frame.header["result"]["name"] == name


@pytest.mark.parametrize("header", [
    {},
    {"kind": "nope"},
    {"kind": ["hello"]},
    {"kind": {"a": 1}},
    {"kind": "hello", "protocol": "mvm", "version": 1},
    {"kind": "hello", "protocol": "other", "version": 1, "role": "x"},
    {"kind": "hello", "protocol": "mvm", "version": "1", "role": "x"},
    {"kind": "hello", "protocol": "mvm", "version": True, "role": "x"},
    {"kind": "request", "op": "ping", "args": {}},
    {"kind": "request", "id": -1, "op": "ping"},
    {"kind": "request", "id": True, "op": "ping"},
    {"kind": "request", "id": 1.0, "op": "ping"},
    {"kind": "request", "id": 1, "op": 5},
    {"kind": "request", "id": 1, "op": "ping", "args": []},
    {"kind": "response", "id": 1},
    {"kind": "response", "id": 1, "ok": "yes"},
    {"kind": "response", "id": 1, "ok": False},
    {"kind": "response", "id": 1, "ok": False, "error": "bad"},
    {"kind": "response", "id": 1, "ok": False, "error": {"message": "no type"}},
    {"kind": "response", "id": 1, "ok": True, "result": [1]},
    {"kind": "response", "id": 1, "ok": True, "result": []},  # not an object, even if empty (or false, 0, "")
    {"kind": "response", "id": 1, "ok": True, "result": False},
    {"kind": "data", "id": 1},
    {"kind": "data", "id": 1, "stream": 1},
    {"kind": "event"},
    {"kind": "event", "event": None},
    {"kind": "cancel"},
    {"kind": "request", "id": 1, "op": "fs.write", "window": None},
    {"kind": "request", "id": 1, "op": "fs.write", "window": 0},
    {"kind": "request", "id": 1, "op": "fs.write", "window": 2**32 + 1},
    {"kind": "request", "id": 1, "op": "fs.write", "window": "1"},
    {"kind": "event", "event": "data.window", "bytes": 5},
    {"kind": "event", "event": "data.window", "id": 0, "bytes": 5},
    {"kind": "event", "event": "proc.window", "pid": 7, "bytes": 0},
    {"kind": "event", "event": "proc.window", "pid": 7, "bytes": True},
    {"kind": "event", "event": "tcp.window", "stream": 3, "bytes": 2**32 + 1},
    {"kind": "request", "id": 1, "op": "ping", "fds": 2},
    {"kind": "request", "id": 1, "op": "ping", "fds": 0},
])
def test_headers_missing_or_mistyping_their_kinds_fields_are_protocol_errors(header: dict) -> None:
    with pytest.raises(ProtocolError):
        codec.encode(header)
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(raw_frame(json.dumps(header).encode()))


@pytest.mark.parametrize("kind, shown", [("nope", "'nope'"), (None, "null"), (True, "true"), ([1], "[1]")])
def test_an_unknown_kind_is_named_as_either_sdk_shows_values(kind: Any, shown: str) -> None:
    # the TypeScript codec says the same (sdks/typescript/test/protocol.test.ts): no Python repr (None, True)
    kinds = "['cancel', 'data', 'event', 'hello', 'request', 'response']"
    expected = f"unknown frame kind {shown}; expected one of {kinds}"
    with pytest.raises(ProtocolError) as err:
        codec.validate_header({"kind": kind})
    assert str(err.value) == expected


@pytest.mark.parametrize("body", [b"[]", b'"hello"', b"42", b"null", b"true", b"{", b"\xff\xfe{}", b"{}x",
                                  b"[" * 60000 + b"]" * 60000, b'{"kind":' * 5000])
def test_header_bodies_that_are_not_json_objects_are_protocol_errors(body: bytes) -> None:
    if len(body) > MAX_HEADER:
        body = body[:MAX_HEADER]
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(raw_frame(body))


def test_an_oversized_length_prefix_is_refused_before_any_of_it_is_buffered() -> None:
    for prefix in (PREFIX.pack(MAX_HEADER + 1, 0), PREFIX.pack(10, MAX_PAYLOAD + 1),
                   PREFIX.pack(0xFFFFFFFF, 0xFFFFFFFF), PREFIX.pack(0, 0)):
        decoder = FrameDecoder()
        with pytest.raises(ProtocolError):
            decoder.feed(prefix)  # the 8-byte prefix alone is enough to refuse
        assert decoder.buffered == 0


def test_a_decoder_stays_poisoned_after_an_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(raw_frame(b"[]"))
    with pytest.raises(ProtocolError):
        decoder.feed(codec.request(1, "ping"))


def test_check_hello_wants_a_hello_of_the_same_major_version() -> None:
    assert codec.check_hello(decode_all(codec.hello("x"))[0])["role"] == "x"
    with pytest.raises(ProtocolError, match="expected hello"):
        codec.check_hello(decode_all(codec.request(1, "ping"))[0])
    future = raw_frame(json.dumps({"kind": "hello", "protocol": "mvm", "version": 99, "role": "x"}).encode())
    with pytest.raises(ProtocolError, match="v99"):
        codec.check_hello(decode_all(future)[0])


# -- properties -----------------------------------------------------------------------------


@settings(max_examples=300)
@given(frames)
def test_any_valid_frame_round_trips(frame: tuple[dict, bytes]) -> None:
    header, payload = frame
    decoded = decode_all(codec.encode(header, payload))
    assert len(decoded) == 1
    assert decoded[0].header == header and decoded[0].payload == payload


@settings(max_examples=200)
@given(st.lists(frames, min_size=1, max_size=8), st.data())
def test_splitting_the_stream_anywhere_yields_the_same_frames(items: list, data: st.DataObject) -> None:
    stream = b"".join(codec.encode(h, p) for h, p in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder()
    decoded: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoded += decoder.feed(stream[start:end])
    assert [(f.header, f.payload) for f in decoded] == items
    assert decoder.buffered == 0


@settings(max_examples=200)
@given(frames)
def test_every_truncation_of_a_frame_just_needs_more_bytes(frame: tuple[dict, bytes]) -> None:
    encoded = codec.encode(*frame)
    for length in sorted({0, 1, 7, 8, 9, len(encoded) // 2, len(encoded) - 1}):
        if 0 <= length < len(encoded):
            decoder = FrameDecoder()
            assert decoder.feed(encoded[:length]) == []
            assert decoder.buffered == length


def _feed_checked(chunks: list[bytes]) -> None:
    """Feed chunks; the only outcomes allowed are frames, 'need more', or ProtocolError."""
    decoder = FrameDecoder()
    for chunk in chunks:
        try:
            for frame in decoder.feed(chunk):
                codec.validate_header(frame.header)  # anything delivered is a valid frame
        except ProtocolError:
            return
        # Whatever is held back is at most one frame's worth: never unbounded.
        assert decoder.buffered <= PREFIX.size + MAX_HEADER + MAX_PAYLOAD


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=512), max_size=8))
def test_random_bytes_give_frames_or_a_protocol_error_and_nothing_else(chunks: list[bytes]) -> None:
    _feed_checked(chunks)


@settings(max_examples=300)
@given(json_values | objects, st.binary(max_size=64))
def test_arbitrary_json_headers_are_validated(value: Any, payload: bytes) -> None:
    _feed_checked([raw_frame(json.dumps(value).encode(), payload)])


@settings(max_examples=300)
@given(headers().map(lambda h: {**h, "kind": "request", "id": 1, "op": "ping"}), st.sampled_from(
    ["kind", "id", "op", "args"]), json_values)
def test_wrong_field_types_are_protocol_errors_or_valid(header: dict, field: str, value: Any) -> None:
    header[field] = value
    _feed_checked([raw_frame(json.dumps(header).encode())])


@settings(max_examples=300)
@given(frames, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4), st.data())
def test_corrupted_frames_never_raise_anything_but_protocol_error(frame: tuple[dict, bytes], flips: list,
                                                                  data: st.DataObject) -> None:
    encoded = bytearray(codec.encode(*frame))
    for position, value in flips:
        encoded[position % len(encoded)] = value
    cut = data.draw(st.integers(0, len(encoded)))
    _feed_checked([bytes(encoded[:cut]), bytes(encoded[cut:])])


@settings(max_examples=200)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_any_length_prefix_is_refused_or_waited_for_within_bounds(header_len: int, payload_len: int) -> None:
    decoder = FrameDecoder()
    try:
        assert decoder.feed(PREFIX.pack(header_len, payload_len)) == []
    except ProtocolError:
        assert header_len == 0 or header_len > MAX_HEADER or payload_len > MAX_PAYLOAD
        assert decoder.buffered == 0
    else:
        assert 0 < header_len <= MAX_HEADER and payload_len <= MAX_PAYLOAD


def test_a_big_payload_assembled_in_place_decodes_like_one_fed_through_the_buffer() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    wire = codec.data(3, codec.TCP_STREAM, payload) + codec.event("tcp.window", stream=3, bytes=5)
    fed = FrameDecoder()
    frames = [f for i in range(0, len(wire), 10_000) for f in fed.feed(wire[i : i + 10_000])]
    direct = FrameDecoder()
    head = len(wire) - len(payload) - len(codec.event("tcp.window", stream=3, bytes=5))
    assert direct.feed(wire[: head + 100]) == []
    view = direct.direct_payload()
    assert view is not None and len(view) == len(payload) - 100
    view[:] = payload[100:]
    assert direct.filled(len(view)) != []
    assert direct.direct_payload() is None
    assert direct.feed(wire[head + len(payload) :])[0].header["event"] == "tcp.window"
    assert [(f.header, bytes(f.payload)) for f in frames] == [
        ({"kind": "data", "id": 3, "stream": "tcp"}, payload), ({"kind": "event", "event": "tcp.window",
                                                                 "stream": 3, "bytes": 5}, b"")]
