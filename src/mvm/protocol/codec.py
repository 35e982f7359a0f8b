"""The mvm framed protocol as a pure codec: bytes in, frames out; no I/O.

Wire format of one frame (all integers big-endian)::

    +----------------+-----------------+------------------+-----------------+
    | u32 header_len | u32 payload_len | header (UTF-8    | payload (raw    |
    |                |                 | JSON object)     | bytes)          |
    +----------------+-----------------+------------------+-----------------+

The header is a JSON object with at least ``"kind"``; the payload carries file
and stream bytes unencoded. ``MAX_HEADER`` and ``MAX_PAYLOAD`` bound each frame:
a peer announcing more is a protocol error, raised before any byte of it is
buffered. This module is stdlib-only because it is copied into every guest.
See docs/protocol.md for the message vocabulary.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from .shown import shown

PROTOCOL_NAME = "mvm"
PROTOCOL_VERSION = 1

PREFIX = struct.Struct(">II")
#: Largest header accepted (JSON metadata only; file bytes go in the payload). Big enough for
#: a command line as long as Linux takes (argv + env up to ARG_MAX, 2 MiB) with JSON escaping.
MAX_HEADER = 4 * 1024 * 1024
#: Largest payload accepted in one frame. Senders chunk at ``CHUNK_SIZE``.
MAX_PAYLOAD = 4 * 1024 * 1024
#: Size senders use when splitting file and stream bytes into frames.
CHUNK_SIZE = 1024 * 1024

KINDS = frozenset({"hello", "request", "response", "data", "event", "cancel"})

#: ``data`` frames on this stream carry the bytes of a relayed TCP connection (``id`` = stream id).
TCP_STREAM = "tcp"
#: Bytes either end of a TCP stream may send before the receiver grants more (``tcp.window``).
TCP_WINDOW = 256 * 1024
#: Events that open, credit and abort TCP streams (their fields are checked here; docs/protocol.md).
TCP_EVENTS = frozenset({"tcp.open", "tcp.window", "tcp.close"})
#: The receive window of every flow-controlled byte stream (docs/protocol.md, "Flow control"):
#: a relayed TCP stream (grown from ``TCP_WINDOW`` by a grant once both ends know it), a
#: request's ``data`` frames (its header's ``window``) and a process's output on the agent hop
#: (``proc.start``'s ``output_window``). A receiver grants back at least every ``GRANT_STEP``.
STREAM_WINDOW = 2 * 1024 * 1024


def grant_step(window: int) -> int:
    """How much a receiver with ``window`` bytes of credit lets accumulate before granting it back."""
    return max(window // 4, 1)


GRANT_STEP = grant_step(STREAM_WINDOW)
#: The credit events (``bytes`` in 1..2**32 more may be sent) and the field naming what they credit.
WINDOW_EVENTS = {"tcp.window": "stream", "data.window": "id", "proc.window": "pid"}
#: Largest credit one grant or a request's ``window`` may give.
MAX_GRANT = 1 << 32
#: Most file descriptors one frame carries (header field ``fds``; SCM_RIGHTS on an AF_UNIX channel,
#: the namespace backend's agent handing a connected socket to the supervisor).
MAX_FDS = 1


class ProtocolError(Exception):
    """The peer sent something that is not a valid mvm frame."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: a JSON header and raw payload bytes -- and, from a channel that
    receives them, the descriptors its header announced (``fds``; owned by whoever takes
    the frame: use them or close them)."""

    header: dict[str, Any]
    payload: bytes = b""
    fds: tuple[int, ...] = field(default=(), compare=False)

    @property
    def kind(self) -> str:
        return str(self.header["kind"])

    @property
    def id(self) -> int | None:
        value = self.header.get("id")
        return value if isinstance(value, int) else None


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Serialise one frame; raises ``ProtocolError`` if it would exceed the limits."""
    validate_header(header)
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A str that is not valid Unicode (a lone surrogate, e.g. a non-UTF-8 file name decoded with
        # surrogateescape): \u escapes keep it intact for a Python peer, and the frame stays UTF-8.
        raw = _dumps_ascii(header)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"header is not JSON-serialisable: {exc}") from None
    if len(raw) > MAX_HEADER:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds MAX_HEADER={MAX_HEADER}")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
    return PREFIX.pack(len(raw), len(payload)) + raw + bytes(payload)


def encode_parts(header: dict[str, Any], payload: bytes) -> tuple[bytes, bytes]:
    """``encode`` as (prefix + header, payload) for a gathering write: a big payload is not
    copied into one buffer with its header (``FramedChannel.send_raw`` takes either form)."""
    head = encode(header)
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
    return PREFIX.pack(len(head) - PREFIX.size, len(payload)) + head[PREFIX.size:], payload


#: One encoded frame: its bytes, or (prefix + header, payload) from ``encode_parts``.
Encoded = bytes | tuple[bytes, bytes]


def _dumps_ascii(header: dict[str, Any]) -> bytes:
    try:
        return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"header is not JSON-serialisable: {exc}") from None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_header(header: Any) -> None:
    """Check the fields every frame kind requires (not the op-specific arguments)."""
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {shown(kind)}; expected one of {shown(sorted(KINDS))}")
    fds = header.get("fds")
    if fds is not None and (not _is_int(fds) or not 1 <= fds <= MAX_FDS):
        raise ProtocolError(f"'fds' must be an integer in 1..{MAX_FDS}")
    if kind == "hello":
        if header.get("protocol") != PROTOCOL_NAME or not _is_int(header.get("version")):
            raise ProtocolError("hello needs protocol='mvm' and an integer version")
        if not isinstance(header.get("role"), str):
            raise ProtocolError("hello needs a string 'role'")
        return
    if kind == "event":
        if not isinstance(header.get("event"), str):
            raise ProtocolError("event frame needs a string 'event'")
        if header["event"] in TCP_EVENTS:
            _validate_tcp_event(header)
        elif header["event"] in WINDOW_EVENTS:
            _validate_grant(header)
        return
    ident = header.get("id")
    if not _is_int(ident) or ident < 0:
        raise ProtocolError(f"{kind} frame needs a non-negative integer 'id'")
    if kind == "request" and not isinstance(header.get("op"), str):
        raise ProtocolError("request frame needs a string 'op'")
    if kind == "request" and not isinstance(header.get("args", {}), dict):
        raise ProtocolError("request 'args' must be an object")
    if kind == "request" and "window" in header:
        window = header["window"]
        if not _is_int(window) or not 1 <= window <= MAX_GRANT:
            raise ProtocolError("request 'window' must be an integer in 1..2**32")
    if kind == "response":
        if not isinstance(header.get("ok"), bool):
            raise ProtocolError("response frame needs a boolean 'ok'")
        result = header.get("result")
        if header["ok"] and result is not None and not isinstance(result, dict):
            raise ProtocolError("response 'result' must be an object")
        if not header["ok"]:
            error = header.get("error")
            if not isinstance(error, dict) or not isinstance(error.get("type"), str):
                raise ProtocolError("failed response needs an 'error' object with a string 'type'")
    if kind == "data":
        if not isinstance(header.get("stream"), str):
            raise ProtocolError("data frame needs a string 'stream'")
        if header["stream"] == TCP_STREAM:
            if ident < 1:
                raise ProtocolError("a tcp data frame needs a stream id >= 1")
            if "eof" in header and not isinstance(header["eof"], bool):
                raise ProtocolError("a tcp data frame's 'eof' must be a boolean")


def _validate_tcp_event(header: dict[str, Any]) -> None:
    name = header["event"]
    stream = header.get("stream")
    if not _is_int(stream) or stream < 1:
        raise ProtocolError(f"{name} needs an integer 'stream' >= 1")
    if name == "tcp.window":
        _validate_grant(header)
    elif name == "tcp.open":
        port = header.get("port")
        if not _is_int(port) or not 1 <= port <= 65535:
            raise ProtocolError("tcp.open needs an integer 'port' in 1..65535")
        if not isinstance(header.get("peer", ""), str):
            raise ProtocolError("tcp.open's 'peer' must be a string")
    elif not isinstance(header.get("reason", ""), str):
        raise ProtocolError("tcp.close's 'reason' must be a string")


def _validate_grant(header: dict[str, Any]) -> None:
    """A credit event: what it credits (``WINDOW_EVENTS``) >= 1, ``bytes`` in 1..2**32."""
    name = header["event"]
    target = WINDOW_EVENTS[name]
    if not _is_int(header.get(target)) or header[target] < 1:
        raise ProtocolError(f"{name} needs an integer '{target}' >= 1")
    grant = header.get("bytes")
    if not _is_int(grant) or not 1 <= grant <= MAX_GRANT:
        raise ProtocolError(f"{name} needs an integer 'bytes' in 1..2**32")


#: A payload at least this big, not yet fully received, is read straight into its own buffer
#: (``FrameDecoder.direct_payload``) instead of through the decoder's buffer.
DIRECT_MIN = 64 * 1024


@dataclass
class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get whole frames back.

    After a ``ProtocolError`` the decoder is poisoned (the stream is out of sync)
    and every later ``feed`` raises again.

    A big payload (``DIRECT_MIN``) is assembled in a buffer of its own once its header
    has arrived: a reader that can ``recv_into`` asks for the rest with
    ``direct_payload``/``filled``, and the bytes are copied once from the kernel into that
    buffer instead of three times through this one; ``feed`` keeps working either way.
    A TCP stream payload stays that ``bytearray`` (its consumer, the stream mux, only
    takes a memoryview of it); any other payload becomes ``bytes`` (one copy).
    """

    _buffer: bytearray = field(default_factory=bytearray)
    _failed: str | None = None
    _direct: bytearray | None = None  # the payload being assembled in place
    _direct_filled: int = 0
    _direct_header: dict[str, Any] = field(default_factory=dict)

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed is not None:
            raise ProtocolError(self._failed)
        frames: list[Frame] = []
        if self._direct is not None:
            take = min(len(self._direct) - self._direct_filled, len(data))
            with memoryview(data) as view:
                self._direct[self._direct_filled : self._direct_filled + take] = view[:take]
            data = data[take:]
            frames += self.filled(take)
        self._buffer += data
        try:
            while self._direct is None:
                frame = self._next()
                if frame is None:
                    return frames
                frames.append(frame)
            return frames
        except ProtocolError as exc:
            self._failed = str(exc)
            self._buffer.clear()
            raise

    def direct_payload(self) -> memoryview | None:
        """Where the rest of a big stream payload goes (read into it, then call ``filled``)."""
        if self._direct is None:
            return None
        return memoryview(self._direct)[self._direct_filled :]

    def filled(self, count: int) -> list[Frame]:
        """``count`` bytes were written into ``direct_payload()``; the frame once complete."""
        assert self._direct is not None
        self._direct_filled += count
        if self._direct_filled < len(self._direct):
            return []
        header, payload = self._direct_header, self._direct
        self._direct, self._direct_filled, self._direct_header = None, 0, {}
        if header["kind"] == "data" and header["stream"] == TCP_STREAM:
            return [Frame(header, payload)]  # type: ignore[arg-type]  # the mux takes a memoryview
        return [Frame(header, bytes(payload))]

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buffer) + self._direct_filled

    def _next(self) -> Frame | None:
        if len(self._buffer) < PREFIX.size:
            return None
        header_len, payload_len = PREFIX.unpack_from(self._buffer)
        if header_len == 0 or header_len > MAX_HEADER:
            raise ProtocolError(f"header length {header_len} outside 1..{MAX_HEADER}")
        if payload_len > MAX_PAYLOAD:
            raise ProtocolError(f"payload length {payload_len} exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
        start = PREFIX.size + header_len
        end = start + payload_len
        if len(self._buffer) < end:
            if payload_len >= DIRECT_MIN and len(self._buffer) >= start:
                self._start_direct(start, payload_len)
            return None
        with memoryview(self._buffer) as view:  # one copy each (a bytearray slice would be two)
            raw = bytes(view[PREFIX.size : start])
            payload = bytes(view[start:end])
        del self._buffer[:end]
        return Frame(_parse_header(raw), payload)

    def _start_direct(self, start: int, payload_len: int) -> None:
        payload = bytearray(payload_len)
        have = len(self._buffer) - start
        with memoryview(self._buffer) as view:
            header = _parse_header(bytes(view[PREFIX.size : start]))
            payload[:have] = view[start:]
        self._buffer.clear()
        self._direct, self._direct_filled, self._direct_header = payload, have, header


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("header JSON is nested too deeply") from None
    validate_header(header)
    return header  # type: ignore[no-any-return]


# ---- constructors: one per frame kind, so no caller spells headers by hand ----


def hello(role: str, **extra: Any) -> bytes:
    return encode({"kind": "hello", "protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION, "role": role, **extra})


def _encoded(header: dict[str, Any], payload: bytes) -> Encoded:
    """A frame with a big payload as parts (sent without copying it behind its header)."""
    return encode_parts(header, payload) if len(payload) >= DIRECT_MIN else encode(header, payload)


def request(ident: int, op: str, args: dict[str, Any] | None = None, payload: bytes = b"", *,
            window: int | None = None) -> Encoded:
    """A request; with ``window`` its ``data`` frames are flow-controlled (``data.window``)."""
    header: dict[str, Any] = {"kind": "request", "id": ident, "op": op, "args": args or {}}
    if window is not None:
        header["window"] = window
    return _encoded(header, payload)


def response_ok(ident: int, result: dict[str, Any] | None = None, payload: bytes = b"", **extra: Any) -> Encoded:
    return _encoded({"kind": "response", "id": ident, "ok": True, "result": result or {}, **extra}, payload)


def response_error(ident: int, error_type: str, message: str, **details: Any) -> bytes:
    error = {"type": error_type, "message": message, **details}
    return encode({"kind": "response", "id": ident, "ok": False, "error": error})


def data(ident: int, stream: str, payload: bytes, **extra: Any) -> bytes:
    return encode({"kind": "data", "id": ident, "stream": stream, **extra}, payload)


def data_parts(ident: int, stream: str, payload: bytes, **extra: Any) -> tuple[bytes, bytes]:
    """``data`` for a gathering write (see ``encode_parts``)."""
    return encode_parts({"kind": "data", "id": ident, "stream": stream, **extra}, payload)


def event(name: str, payload: bytes = b"", **fields: Any) -> bytes:
    return encode({"kind": "event", "event": name, **fields}, payload)


def cancel(ident: int) -> bytes:
    return encode({"kind": "cancel", "id": ident})


def check_hello(frame: Frame) -> dict[str, Any]:
    """Validate the peer's hello; returns its header. Major version must match."""
    if frame.kind != "hello":
        raise ProtocolError(f"expected hello, got {frame.kind}")
    if frame.header["version"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks mvm protocol v{frame.header['version']}, this side v{PROTOCOL_VERSION}"
        )
    return frame.header
