"""Golden protocol frames shared by the Python and the TypeScript SDK.

Each ``tests/fixtures/protocol/<operation>.json`` names one SDK call in both languages
(``python``/``typescript``), the answers a supervisor gives it (``replies``), and the
exact frames the SDK must send for it (``frames``: the hello, then every request and
cancel, each as its header plus the full encoded frame in hex — or its sha256 and size
when large). This test points the real Python SDK at a fake supervisor — a real Unix
socket with a framed peer that records the bytes it receives and answers as scripted —
and checks the wire output frame for frame; ``sdks/typescript/test/golden.test.ts``
does the same for the TypeScript SDK. Changing a frame on one side without the other
fails one of them.

Regenerate the ``frames`` from the Python SDK (after an intended protocol change, which
the TypeScript SDK must then follow) with::

    MVM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/protocol/test_golden_frames.py
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

import mvm
from mvm.protocol import codec
from mvm.protocol.codec import CHUNK_SIZE, PREFIX, FrameDecoder
from mvm.sdk.sandbox import Sandbox

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "protocol"
UPDATE = os.environ.get("MVM_UPDATE_GOLDEN") == "1"
#: Frames up to this size are stored as hex; larger ones by sha256 and size.
SMALL_FRAME = 2048
#: The same bytes in both tests: CHUNK_SIZE + 10 bytes, so ``files.write`` chunks them.
BIG = bytes((i * 7) % 256 for i in range(CHUNK_SIZE + 10))
SANDBOX_ID = "sb-golden0001"
SECRET_VALUE = "golden-secret-value"


def fixture_paths() -> list[Path]:
    return sorted(FIXTURES.glob("*.json"))


def describe_frame(raw: bytes) -> dict[str, Any]:
    """The fixture form of one encoded frame (its header decoded by the reference codec)."""
    (frame,) = FrameDecoder().feed(raw)
    out: dict[str, Any] = {
        "header": frame.header,
        "payload_size": len(frame.payload),
        "payload_sha256": hashlib.sha256(frame.payload).hexdigest(),
        "frame_size": len(raw),
        "frame_sha256": hashlib.sha256(raw).hexdigest(),
    }
    if len(raw) <= SMALL_FRAME:
        out["frame_hex"] = raw.hex()
    return out


class FakeSupervisor:
    """One connection's worth of supervisor: records each frame's exact bytes, answers
    requests from ``replies`` (``data`` frames, then a result or an error; or, with
    ``until_cancel``, an error ``Cancelled`` once the client cancels)."""

    def __init__(self, directory: Path, replies: dict[str, Any]):
        self.path = directory / "control.sock"
        self.replies = replies
        self.received: list[bytes] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.listener.close()

    def _read_exact(self, conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read_frame(self, conn: socket.socket) -> bytes:
        prefix = self._read_exact(conn, PREFIX.size)
        header_len, payload_len = PREFIX.unpack(prefix)
        raw = prefix + self._read_exact(conn, header_len + payload_len)
        self.received.append(raw)
        return raw

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            self.done.set()
            return
        waiting: set[int] = set()
        try:
            hello = FrameDecoder().feed(self._read_frame(conn))[0]
            codec.check_hello(hello)
            conn.sendall(codec.hello("supervisor", sandbox_id=SANDBOX_ID))
            while True:
                (frame,) = FrameDecoder().feed(self._read_frame(conn))
                if frame.kind == "cancel":
                    if frame.id in waiting:
                        waiting.discard(frame.id)
                        conn.sendall(codec.response_error(frame.id, "Cancelled", "cancelled by the client"))
                    continue
                assert frame.kind == "request", frame.header
                reply = self.replies.get(frame.header["op"], {})
                for item in reply.get("data", []):
                    conn.sendall(codec.data(frame.id, item["stream"], bytes.fromhex(item["payload_hex"])))
                if reply.get("until_cancel"):
                    waiting.add(frame.id)
                elif "error" in reply:
                    error = dict(reply["error"])
                    conn.sendall(codec.response_error(frame.id, error.pop("type"), error.pop("message"), **error))
                else:
                    conn.sendall(codec.response_ok(frame.id, reply.get("result") or {},
                                                   bytes.fromhex(reply.get("payload_hex", ""))))
        except (EOFError, ConnectionError, OSError):
            pass
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            conn.close()
            self.done.set()


def first(iterator: Any) -> Any:
    """The first item of a generator, then close it (leaving the loop early)."""
    for item in iterator:
        iterator.close()
        return item
    return None


def capture(fixture: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Run the fixture's Python call against a fake supervisor; the frames it sent."""
    monkeypatch.setenv("MVM_SECRET_GOLDEN_TOKEN", SECRET_VALUE)
    with tempfile.TemporaryDirectory(prefix="mvm-golden-", dir="/tmp") as tmp:
        server = FakeSupervisor(Path(tmp), fixture["replies"])
        sandbox = Sandbox(SANDBOX_ID, "golden", Path(tmp))
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["value"] = eval(fixture["python"], {  # the fixture's own call, from the repo
                    "sandbox": sandbox, "mvm": mvm, "Process": mvm.Process, "BIG": BIG, "first": first})
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(15)
        assert not worker.is_alive(), f"{fixture['python']} did not finish against the fake supervisor"
        sandbox.close()
        assert server.done.wait(10), "the fake supervisor never saw the connection close"
        server.close()
        if "error" in outcome:
            raise outcome["error"]
        if server.error is not None:
            raise server.error
        return [describe_frame(raw) for raw in server.received]


def test_there_is_a_fixture_per_operation() -> None:
    names = {p.stem for p in fixture_paths()}
    for op in ("exec.run", "proc.start", "proc.attach", "proc.wait", "proc.signal", "proc.stdin", "proc.list",
               "proc.info", "fs.write", "fs.write-chunked", "fs.read", "fs.list", "fs.stat", "fs.mkdir",
               "fs.remove", "fs.move", "sandbox.describe", "sandbox.logs", "sandbox.stop", "sandbox.start",
               "sandbox.pause", "sandbox.resume", "sandbox.snapshot", "sandbox.destroy"):
        assert op in names, f"no golden fixture for {op}"
    for path in fixture_paths():
        doc = json.loads(path.read_text())
        assert {"operation", "python", "typescript", "replies", "frames"} <= set(doc), path.name
        assert UPDATE or doc["frames"], f"{path.name} has no frames (regenerate with MVM_UPDATE_GOLDEN=1)"


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.stem)
def test_python_sdk_sends_the_golden_frames(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = json.loads(path.read_text())
    frames = capture(doc, monkeypatch)
    if UPDATE:
        doc["frames"] = frames
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return
    assert frames[0]["header"] == {"kind": "hello", "protocol": "mvm", "version": 1, "role": "client"}
    assert frames == doc["frames"], (
        f"the Python SDK's frames for {doc['python']} changed; if that is intended, regenerate with "
        "MVM_UPDATE_GOLDEN=1 and make the TypeScript SDK send the same")


def payload_of(frame: dict[str, Any]) -> bytes:
    """A fixture frame's payload: from its hex, or (a large frame) the piece of ``BIG`` it carries."""
    if "frame_hex" in frame:
        raw = bytes.fromhex(frame["frame_hex"])
        header_len, _ = PREFIX.unpack(raw[: PREFIX.size])
        return raw[PREFIX.size + header_len :]
    for candidate in (BIG[:CHUNK_SIZE], BIG[CHUNK_SIZE:], BIG):
        if hashlib.sha256(candidate).hexdigest() == frame["payload_sha256"]:
            return candidate
    raise AssertionError(f"unknown large payload {frame['payload_sha256']}")


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.stem)
def test_reference_codec_encodes_the_golden_headers(path: Path) -> None:
    """codec.encode(header, payload) gives back each fixture frame byte for byte."""
    for frame in json.loads(path.read_text())["frames"]:
        encoded = codec.encode(frame["header"], payload_of(frame))
        assert len(encoded) == frame["frame_size"]
        assert hashlib.sha256(encoded).hexdigest() == frame["frame_sha256"]
        if "frame_hex" in frame:
            assert encoded.hex() == frame["frame_hex"]
