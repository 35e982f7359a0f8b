"""A streamed ``fs.read`` keeps the supervisor's memory bounded: a client that stops
reading stalls the read (the supervisor does not pull the file from the agent into its
memory), and a client that gives up (an ``AsyncSandbox`` cancelling) leaves no request
behind. The data path itself is tested on every backend in tests/sdk/test_files.py."""

from __future__ import annotations

import array
import asyncio
import fcntl
import hashlib
import os
import socket
import termios
from pathlib import Path

import pytest

import mvm
from mvm.backends import availability
from mvm.protocol import codec
from mvm.protocol.channel import FramedChannel
from mvm.supervisor.state import CONTROL_SOCKET
from tests.waiting import wait_for, wait_stalled

pytestmark = pytest.mark.skipif(not availability("namespace").ok, reason="namespace backend unavailable here")

FILE_SIZE = 96 * 1024 * 1024
#: What the supervisor may hold for a stalled read: READ_AHEAD chunks, socket buffers, slack.
MEMORY_BOUND = 32 * 1024 * 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _queued(sock: socket.socket) -> int:
    """Bytes waiting in our receive buffer (unread)."""
    out = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, out)
    return out[0]


def _audited_reads(sandbox_id: str) -> list[dict[str, object]]:
    from mvm.security.audit import log_path, tail

    return [e for e in tail(log_path(sandbox_id), 100_000) if e.get("op") == "fs.read"]


def test_a_client_that_stops_reading_stalls_the_read_without_the_supervisor_buffering_it() -> None:
    data = os.urandom(FILE_SIZE)
    with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="10m") as sb:
        sb.files.write("/tmp/big.bin", data)
        supervisor = sb.describe().details["supervisor_pid"]
        before = _rss(supervisor)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(str(Path(sb._directory) / CONTROL_SOCKET))
        channel = FramedChannel(sock)
        try:
            channel.handshake("client")
            channel.send_raw(codec.request(1, "fs.read", {"path": "/tmp/big.bin", "max_bytes": FILE_SIZE}))
            wait_stalled(lambda: _queued(sock), "the supervisor filling our unread socket buffer")
            assert _rss(supervisor) - before < MEMORY_BOUND, "the supervisor buffered a read nobody takes"
            assert sb.commands.run(["true"]).exit_code == 0  # other clients are served meanwhile
            # Reading again resumes the stalled stream; the file arrives whole.
            digest, received = hashlib.sha256(), 0
            while True:
                frame = channel.recv()
                if frame.kind == "data":
                    assert frame.header["stream"] == "file"
                    digest.update(frame.payload)
                    received += len(frame.payload)
                    continue
                assert frame.kind == "response" and frame.header["ok"], frame.header
                break
            assert frame.header["result"]["size"] == received == FILE_SIZE
            assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
        finally:
            channel.close()


def test_an_async_reader_that_gives_up_leaves_nothing_stuck() -> None:
    async def scenario() -> None:
        async with await mvm.AsyncSandbox.create("python-3.13", backend="namespace", ttl="10m") as sb:
            data = os.urandom(FILE_SIZE)
            await sb.files.write("/tmp/big.bin", data)
            supervisor = (await sb.describe()).details["supervisor_pid"]
            idle_threads = _threads(supervisor)
            client = await sb._client()
            stream = client.stream("fs.read", {"path": "/tmp/big.bin", "max_bytes": FILE_SIZE})
            first = await anext(stream)
            assert first[0] == "file" and first[1] == data[: len(first[1])]
            await stream.aclose()  # cancels the request in the supervisor

            # The supervisor's request thread ends (it stops between chunks), and the handle goes on.
            await asyncio.to_thread(wait_for, lambda: _threads(supervisor) <= idle_threads,
                                    "the cancelled read's supervisor thread to end")
            assert await sb.files.read("/tmp/big.bin", max_bytes=FILE_SIZE) == data

            # A task cancelled in the middle of files.read: the same.
            reads_before = len(_audited_reads(sb.id))
            reading = asyncio.create_task(sb.files.read("/tmp/big.bin", max_bytes=FILE_SIZE))

            async def streaming() -> bool:  # audited before its first byte leaves the supervisor
                await asyncio.sleep(0.005)
                return len(_audited_reads(sb.id)) > reads_before

            async with asyncio.timeout(60):
                while not await streaming():
                    pass
            assert not reading.done()
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            await asyncio.to_thread(wait_for, lambda: _threads(supervisor) <= idle_threads,
                                    "the cancelled files.read's supervisor thread to end")
            assert (await sb.commands.run(["echo", "still here"])).stdout == "still here\n"

    asyncio.run(scenario())
