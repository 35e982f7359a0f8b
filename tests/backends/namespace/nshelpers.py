"""Test helpers for the namespace backend: a minimal supervisor side of the protocol."""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass, field

from mvm.protocol import codec
from mvm.protocol.channel import FramedChannel

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Result:
    exit_code: int | None
    signal: int | None
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclass
class Guest:
    """A minimal supervisor side: hello, then ``proc.start`` and its events."""

    sock: socket.socket
    peer: dict = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.sock.settimeout(60)
        self.ch = FramedChannel(self.sock)
        self.peer = self.ch.handshake("supervisor")
        self._early: list = []

    def request(self, op: str, args: dict | None = None, payload: bytes = b"") -> dict:
        ident = next(self._ids)
        self.ch.send_raw(codec.request(ident, op, args or {}, payload))
        while True:
            frame = self.ch.recv()
            if frame.kind == "response" and frame.id == ident:
                if not frame.header["ok"]:
                    raise RuntimeError(f"{op} failed: {frame.header['error']}")
                return frame.header["result"]
            if frame.kind == "event":
                self._early.append(frame)

    def run(self, argv: list[str], timeout: float = 60, env: dict | None = None) -> Result:
        self.sock.settimeout(timeout)
        started = self.request(
            "proc.start", {"argv": argv, "env": {"PATH": GUEST_PATH, **(env or {})}, "cwd": "/", "stdin": False}
        )
        pid = started["pid"]
        result = Result(None, None)
        pending, self._early = self._early, []
        frames = iter(pending)
        while True:
            frame = next(frames, None) or self.ch.recv()
            if frame.kind != "event" or frame.header.get("pid") != pid:
                if frame.kind == "event":
                    self._early.append(frame)
                continue
            if frame.header["event"] == "proc.output":
                if frame.header["stream"] == "stdout":
                    result.stdout += frame.payload
                else:
                    result.stderr += frame.payload
            elif frame.header["event"] == "proc.exit":
                result.exit_code = frame.header.get("exit_code")
                result.signal = frame.header.get("signal")
                return result

    def py(self, code: str, timeout: float = 60) -> Result:
        return self.run(["/usr/bin/python3", "-c", code], timeout=timeout)

    def sh(self, script: str, timeout: float = 60) -> Result:
        return self.run(["/bin/sh", "-c", script], timeout=timeout)

    def close(self) -> None:
        self.ch.close()
