"""A caller that stops reading a stream holds the process, not memory (docs/protocol.md,
"Flow control"; docs/reliability.md).

A guest process writes far more than any window (``FLOOD_MIB``; namespace and VM backends) while the caller holds its
output stream open and reads nothing: the process blocks once the windows are full, the
resident memory of the client (this process) and of the supervisor stays within a bound
far below the flood, another request on the same sandbox completes meanwhile, and once the
caller reads it gets every byte, in order. The sync and the asyncio clients both; the
TypeScript client in sdks/typescript/test/sandbox.test.ts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator

import pytest
from flooding import assert_all_arrived, expected_digest, flood_script, rss
from waiting import wait_stalled

import mvm
from mvm.backends import availability

BACKENDS = [name for name in ("namespace", "vm") if availability(name).ok] or ["namespace"]
#: The flood per backend, in MiB: under TCG a guest writes a few MiB/s, so the VM's is smaller.
FLOOD_MIB = {"namespace": 256, "vm": 64}


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request: pytest.FixtureRequest) -> Iterator[mvm.Sandbox]:
    with mvm.Sandbox.create("python-3.13", backend=request.param, ttl="15m") as sb:
        yield sb


def flood_of(sandbox: mvm.Sandbox) -> int:
    return FLOOD_MIB[str(sandbox.describe().details["backend"])]


def written_mib(sandbox: mvm.Sandbox) -> int:
    """How many MiB the flooder got into its pipe (read by another request on the same sandbox)."""
    return int(sandbox.files.read_text("/tmp/written"))


def assert_stalled_within_bounds(sandbox: mvm.Sandbox, mib: int, before: dict[int, int]) -> None:
    """The flooder is blocked before a quarter of its flood, memory grew by less than a
    quarter of it (a stalled stream may hold a few 2 MiB windows and the 4 MiB replay ring;
    a queue would hold it all), and another command on the same sandbox completes meanwhile."""
    written = wait_stalled(lambda: written_mib(sandbox), "the flooder to block on its full pipe", settle=1.5,
                           timeout=120)
    assert written < mib // 4, f"the flooder wrote {written} of {mib} MiB with nobody reading"
    grown = {pid: rss(pid) - base for pid, base in before.items()}
    assert all(growth < mib * 1024 * 1024 // 4 for growth in grown.values()), grown
    result = sandbox.commands.run(["echo", "meanwhile"], timeout_seconds=120)
    assert (result.exit_code, result.stdout) == (0, "meanwhile\n")
    assert written_mib(sandbox) == written  # (still held)


def test_a_stalled_reader_holds_the_process_not_the_memory(sandbox: mvm.Sandbox) -> None:
    supervisor, mib = int(sandbox.describe().details["supervisor_pid"]), flood_of(sandbox)
    process = sandbox.commands.start(["python3", "-c", flood_script(mib)], stdin=True)
    chunks = process.output()
    assert next(chunks) == ("stdout", "ready\n")  # attached: the flood is let go only now
    follow = sandbox.logs(follow=True)  # a log follow that reads nothing either
    next(follow)
    before = {os.getpid(): rss(os.getpid()), supervisor: rss(supervisor)}
    process.send_stdin("go\n")
    assert_stalled_within_bounds(sandbox, mib, before)
    assert_all_arrived(chunks, mib)  # every byte, in order
    assert process.wait(timeout=60) == 0
    follow.close()  # type: ignore[attr-defined]


def test_a_stalled_asyncio_reader_holds_the_process_not_the_memory(sandbox: mvm.Sandbox) -> None:
    supervisor, mib = int(sandbox.describe().details["supervisor_pid"]), flood_of(sandbox)

    async def scenario() -> None:
        handle = await mvm.AsyncSandbox.connect(sandbox.id)
        try:
            process = await handle.commands.start(["python3", "-c", flood_script(mib)], stdin=True)
            chunks = process.output()
            assert await anext(chunks) == ("stdout", "ready\n")
            before = {os.getpid(): rss(os.getpid()), supervisor: rss(supervisor)}
            await process.send_stdin("go\n")
            # the event loop goes on (its reader task keeps reading the socket) while nobody reads the stream
            await asyncio.to_thread(assert_stalled_within_bounds, sandbox, mib, before)
            meanwhile = await handle.commands.run(["echo", "on the same connection"], timeout_seconds=120)
            assert meanwhile.stdout == "on the same connection\n"
            digest, received = hashlib.sha256(), 0
            async for stream, text in chunks:
                assert stream == "stdout"
                data = text.encode()
                digest.update(data)
                received += len(data)
            assert received == mib * 1024 * 1024
            assert digest.hexdigest() == expected_digest(mib)
            assert await process.wait(timeout=60) == 0
        finally:
            await handle.close()

    asyncio.run(scenario())
