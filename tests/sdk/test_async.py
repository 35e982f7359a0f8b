"""mvm.AsyncSandbox on real sandboxes. The surface tests run on every backend this machine
can run (one shared sandbox per backend for the read-mostly ones, one more for the
lifecycle); the many-sandboxes concurrency test runs on namespaces, where ten at once
stay cheap."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

import mvm
from mvm.backends import availability
from mvm.backends.base import HOST_ALIAS
from mvm.protocol import CHUNK_SIZE
from mvm.sdk.files import WRITE_WINDOW

TEMPLATE = "python-3.13"

namespace_only = pytest.mark.skipif(not availability("namespace").ok, reason="namespace backend unavailable here")


async def _create(**kwargs: object) -> mvm.AsyncSandbox:
    return await mvm.AsyncSandbox.create(
        TEMPLATE, backend="namespace", ttl="10m", resources=mvm.resources(cpu_cores=1, memory_mb=256), **kwargs
    )


async def _wait_until(predicate: object, what: str, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


def test_surface_commands_files_processes_logs(sandbox: mvm.Sandbox) -> None:
    async def scenario() -> None:
        listed = {s.id for s in await mvm.AsyncSandbox.list()}
        assert sandbox.id in listed
        handle = await mvm.AsyncSandbox.connect(sandbox.name)
        try:
            assert (handle.id, handle.name) == (sandbox.id, sandbox.name)
            entry = await handle.files.write("/app/main.py", "import sys\nprint('hi', sys.argv[1])\n")
            assert entry.size == len("import sys\nprint('hi', sys.argv[1])\n")
            result = await handle.commands.run(["python", "/app/main.py", "async"])
            assert (result.exit_code, result.stdout) == (0, "hi async\n")
            assert result.audit_id and result.audit_id.startswith("aud_")

            big = os.urandom(3 * 1024 * 1024 + 17)  # more than one frame: the chunked write path
            await handle.files.write("/app/big.bin", big)
            assert await handle.files.read("/app/big.bin") == big
            with pytest.raises(mvm.errors.TooLarge):
                await handle.files.read("/app/big.bin", max_bytes=1024)
            names = [e.name for e in await handle.files.list("/app")]
            assert {"big.bin", "main.py"} <= set(names) and names == sorted(names)
            with pytest.raises(mvm.FileNotFoundInSandbox):
                await handle.files.read("/app/missing")
            await handle.files.move("/app/big.bin", "/app/moved.bin")
            assert not await handle.files.exists("/app/big.bin")
            await handle.files.remove("/app/moved.bin")

            # More requests at once than the supervisor takes per connection: the rest queue.
            many = await asyncio.gather(*(handle.commands.run(["echo", str(i)]) for i in range(100)))
            assert [r.stdout for r in many] == [f"{i}\n" for i in range(100)]

            echoed = await handle.commands.run(["wc", "-c"], stdin=big)  # staged stdin, bigger than a frame
            assert echoed.stdout.strip() == str(len(big))

            process = await handle.commands.start(["sh", "-c", "for i in 1 2 3; do echo line $i; done; exit 7"])
            lines = [line async for line in process.stdout]
            assert lines == ["line 1\n", "line 2\n", "line 3\n"]
            assert await process.wait() == 7
            assert await process.exit_code() == 7 and not await process.is_running()
            again = await handle.commands.connect(process.pid)
            assert again.argv == process.argv and await again.exit_code() == 7
            with pytest.raises(mvm.InvalidArgument):
                [line async for line in process.lines("stdin")]

            with pytest.raises(mvm.CommandError):
                await handle.commands.run(["false"], check=True)
            with pytest.raises(mvm.InvalidArgument) as bad:
                await handle.commands.run([])
            assert bad.value.field == "argv"
            with pytest.raises(mvm.InvalidArgument):
                await handle.files.write("relative/path", "x")

            messages = [event.message async for event in handle.logs()]
            assert any("hi async" in message for message in messages)
            info = await handle.describe()
            assert info.id == sandbox.id and await handle.state() == "running"
        finally:
            await handle.close()
        assert sandbox.id in {s.id for s in await mvm.AsyncSandbox.list()}  # close() leaves it running

    asyncio.run(scenario())


def test_streaming_reads_time_out_on_silence_and_follow_sees_new_output(sandbox: mvm.Sandbox) -> None:
    async def scenario() -> None:
        handle = await mvm.AsyncSandbox.connect(sandbox.id)
        try:
            process = await handle.commands.start(["sh", "-c", "echo ready; exec sleep 300"])
            seen: list[str] = []
            with pytest.raises(mvm.StreamIdle) as idle:
                async for stream, text in process.output(idle_timeout=1.0):
                    assert stream == "stdout"
                    seen.append(text)
            assert seen == ["ready\n"]
            assert isinstance(idle.value, TimeoutError)
            assert await process.is_running()  # a reader's timeout leaves the process alone
            await process.kill()
            assert await process.wait() == 128 + 9

            # logs(follow=True) delivers lines printed after it started, then times out on silence.
            followed: list[str] = []

            async def follow() -> None:
                async for event in handle.logs(follow=True, tail=0, idle_timeout=3.0):
                    followed.append(event.message)
                    if "followed-marker" in event.message:
                        return

            reader = asyncio.create_task(follow())
            await asyncio.sleep(0)  # the follow request goes out before the marker is printed
            await handle.commands.run(["echo", "followed-marker"])
            await asyncio.wait_for(reader, 60)
            assert any("followed-marker" in m for m in followed)
            with pytest.raises(mvm.StreamIdle):
                async for _ in handle.logs(follow=True, since=1e12, idle_timeout=0.5):
                    pass
        finally:
            await handle.close()

    asyncio.run(scenario())


def test_cancelling_a_run_kills_its_process_and_leaves_the_handle_usable(sandbox: mvm.Sandbox) -> None:
    async def scenario() -> None:
        handle = await mvm.AsyncSandbox.connect(sandbox.id)
        try:
            await handle.files.remove("/tmp/pid") if await handle.files.exists("/tmp/pid") else None
            task = asyncio.create_task(
                handle.commands.run(["sh", "-c", "echo $$ > /tmp/pid; exec sleep 300"], timeout_seconds=None)
            )
            await _wait_until(lambda: handle.files.exists("/tmp/pid"), "the command to start")
            pid = int((await handle.files.read_text("/tmp/pid")).strip())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            async def gone() -> bool:
                probe = await handle.commands.run(["sh", "-c", f"kill -0 {pid} 2>/dev/null"])
                return probe.exit_code != 0

            await _wait_until(gone, "the cancelled command's process to be killed")
            processes = await handle.commands.list()
            assert not [p for p in processes if p.pid == pid and p.running]
            again = await handle.commands.run(["echo", "still here"])
            assert again.stdout == "still here\n"
        finally:
            await handle.close()

    asyncio.run(scenario())


def test_ports_and_network_policy(sandbox: mvm.Sandbox) -> None:
    async def host_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nhello host")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        handle = await mvm.AsyncSandbox.connect(sandbox.id)
        server = await handle.commands.start(["python", "-m", "http.server", "8123", "--bind", "127.0.0.1",
                                              "--directory", "/app"])
        try:
            await handle.files.write("/app/page.txt", "from the guest")

            async def listening() -> bool:
                probe = await handle.commands.run(
                    ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8123), 1)"]
                )
                return probe.exit_code == 0

            await _wait_until(listening, "the guest HTTP server")
            async with await handle.ports.forward(guest_port=8123) as fwd:
                assert [f.id for f in await handle.ports.list()] == [fwd.id]
                reader, writer = await asyncio.open_connection(fwd.host, fwd.host_port)
                writer.write(b"GET /page.txt HTTP/1.0\r\n\r\n")
                body = await asyncio.wait_for(reader.read(), 60)
                writer.close()
                assert body.endswith(b"from the guest")
            assert await handle.ports.list() == []  # async with closed it
            with pytest.raises(mvm.InvalidArgument):
                await handle.ports.forward(guest_port=0)

            # Egress through the policy: the guest reaches a server of this event loop once allowed.
            host = await asyncio.start_server(host_server, "127.0.0.1", 0)
            port = host.sockets[0].getsockname()[1]
            fetch = ["python", "-c", f"import urllib.request; print(urllib.request.urlopen("
                     f"'http://{HOST_ALIAS}:{port}/', timeout=30).read().decode())"]
            try:
                with pytest.raises(mvm.InvalidNetworkPolicy):
                    await handle.network.update(allow=["pypi.org:99999"])
                policy = await handle.network.update(allow=[f"{HOST_ALIAS}:{port}"])
                assert (policy["mode"], policy["allow"]) == ("allow", [f"{HOST_ALIAS}:{port}"])
                assert (await handle.network.policy())["allow"] == [f"{HOST_ALIAS}:{port}"]
                fetched = await handle.commands.run(fetch, timeout_seconds=120)
                assert fetched.stdout == "hello host\n", fetched.stderr
            finally:
                assert (await handle.network.update(allow=[]))["mode"] == "deny"
                host.close()
            refused = await handle.commands.run(fetch, timeout_seconds=120)
            assert refused.exit_code != 0
        finally:
            await server.kill()
            await handle.close()

    asyncio.run(scenario())


def test_lifecycle_pause_snapshot_restore_stop_start_and_async_with(backend: str) -> None:
    async def scenario() -> None:
        async with await mvm.AsyncSandbox.create(
            TEMPLATE, backend=backend, ttl="10m", resources=mvm.resources(cpu_cores=1, memory_mb=512)
        ) as sb:
            await sb.files.write("/app/state.txt", "before")
            assert (await sb.pause()).state == "paused"
            with pytest.raises(mvm.SandboxPaused):
                await sb.commands.run(["true"])
            resumed = await sb.commands.run(["cat", "/app/state.txt"], auto_resume=True)  # wakes it
            assert resumed.stdout == "before" and await sb.state() == "running"

            snap = await sb.snapshot(name="async-snap")
            assert snap.kind == ("full" if backend == "vm" else "filesystem")
            await sb.files.write("/app/state.txt", "after")
            with pytest.raises(mvm.errors.SnapshotNotFound):  # an unknown snapshot leaves it running as it was
                await sb.resume("no-such-snapshot")
            assert (await sb.commands.run(["cat", "/app/state.txt"])).stdout == "after"
            assert (await sb.resume(snap)).state == "running"
            assert await sb.files.read_text("/app/state.txt") == "before"

            assert (await sb.stop()).state == "stopped"
            assert (await sb.start()).state == "running"
            assert (await sb.commands.run(["echo", "back"])).stdout == "back\n"
            sandbox_id = sb.id
        assert sandbox_id not in {s.id for s in await mvm.AsyncSandbox.list()}  # async with destroyed it
        with pytest.raises(mvm.InvalidState):
            await sb.commands.run(["true"])
        await sb.kill()  # twice is fine

    asyncio.run(scenario())


@namespace_only
def test_200_commands_and_50_file_transfers_over_10_sandboxes_from_one_loop() -> None:
    async def scenario() -> None:
        sandboxes = await asyncio.gather(*(_create() for _ in range(10)))
        try:
            finished: list[str] = []
            payloads = {i: os.urandom(64 * 1024 + i) for i in range(50)}

            async def command(i: int) -> None:
                sandbox = sandboxes[i % 10]
                result = await sandbox.commands.run(["sh", "-c", f"echo {i}; echo err{i} >&2"])
                assert (result.exit_code, result.stdout, result.stderr) == (0, f"{i}\n", f"err{i}\n")
                finished.append("command")

            async def transfer(i: int) -> None:
                sandbox = sandboxes[i % 10]
                await sandbox.files.write(f"/tmp/t{i}", payloads[i])
                assert await sandbox.files.read(f"/tmp/t{i}") == payloads[i]
                finished.append("file")

            async def held(sandbox: mvm.AsyncSandbox) -> None:
                # A command that runs until /tmp/go exists: written only once every transfer is done.
                result = await sandbox.commands.run(
                    ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.01; done; echo through"], timeout_seconds=300)
                assert result.stdout == "through\n"
                finished.append("held")

            async def transfers_then_release() -> None:
                await asyncio.gather(*(transfer(i) for i in range(50)))
                await asyncio.gather(*(sandbox.files.write("/tmp/go", b"") for sandbox in sandboxes))

            await asyncio.gather(*(held(sandbox) for sandbox in sandboxes), *(command(i) for i in range(200)),
                                 transfers_then_release())
            assert finished.count("command") == 200 and finished.count("file") == 50
            # No starvation: every transfer was served while a command of each sandbox was still
            # running (the held ones end only after the last transfer), in the order of events.
            assert finished.index("held") > max(i for i, what in enumerate(finished) if what == "file")
            # Every sandbox's files arrived whole (checked inside the guest too).
            sums = await sandboxes[3].commands.run(["sha256sum", "/tmp/t3", "/tmp/t13"])
            assert hashlib.sha256(payloads[3]).hexdigest() in sums.stdout
            assert hashlib.sha256(payloads[13]).hexdigest() in sums.stdout
        finally:
            await asyncio.gather(*(sandbox.kill() for sandbox in sandboxes))

    asyncio.run(scenario())


@namespace_only
def test_record_mode_records_rather_than_create_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """In record mode AsyncSandbox.create records (tests/modes/test_async_modes.py has the IR
    parity with the sync SDK); nothing live is made."""
    before = {s.id for s in mvm.Sandbox.list()}
    monkeypatch.setenv("MVM_MODE", "record")

    async def script() -> bool:
        async with await _create() as sandbox:
            return sandbox.recorded and (await sandbox.commands.run(["true"])).recorded

    assert asyncio.run(script()) is True
    monkeypatch.delenv("MVM_MODE")
    assert {s.id for s in mvm.Sandbox.list()} == before


@namespace_only
def test_cancelling_a_chunked_write_or_a_reader_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        async with await _create() as sandbox:
            await sandbox.files.mkdir("/srv/in")
            data = os.urandom(3 * WRITE_WINDOW * CHUNK_SIZE)  # three windows of chunks
            # The cancel must land mid-transfer, not during the commit (a commit cannot be
            # undone: see AsyncFiles.write). A 96 MiB write here is done in ~0.1 s, so a
            # cancel timed by polling for the temp file sometimes came during the commit
            # and found the file written. The writer is held, on the real connection, after
            # its second window was answered: a third is still to send when it is cancelled.
            client = await sandbox._client()
            send_window = client.call_many
            windows_answered = 0
            mid_transfer = asyncio.Event()

            async def held_after_two_windows(requests: object) -> object:
                nonlocal windows_answered
                answers = await send_window(requests)  # type: ignore[arg-type]
                windows_answered += 1
                if windows_answered == 2:
                    mid_transfer.set()
                    await asyncio.Event().wait()  # until cancelled
                return answers

            client.call_many = held_after_two_windows  # type: ignore[method-assign]
            writer = asyncio.create_task(sandbox.files.write("/srv/in/big.bin", data))
            await asyncio.wait_for(mid_transfer.wait(), 60)
            temps = [e for e in await sandbox.files.list("/srv/in") if e.name.endswith(".tmp")]
            assert len(temps) == 1 and temps[0].size == 2 * WRITE_WINDOW * CHUNK_SIZE, temps
            writer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await writer
            del client.call_many

            async def cleaned_up() -> bool:
                return await sandbox.files.list("/srv/in") == []

            await _wait_until(cleaned_up, "the aborted write's temporary file to go")  # no partial file either

            # A cancelled reader ends its stream only; the process and the handle go on.
            process = await sandbox.commands.start(["sh", "-c", "while :; do echo tick; sleep 0.1; done"])

            reading = asyncio.Event()

            async def read_forever() -> None:
                async for _ in process.output():
                    reading.set()

            reader = asyncio.create_task(read_forever())
            await asyncio.wait_for(reading.wait(), 60)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            assert await process.is_running()
            await process.kill()
            assert await process.wait() == 128 + 9
            small = await sandbox.files.write("/srv/in/small.txt", "ok")
            assert small.size == 2 and [e.name for e in await sandbox.files.list("/srv/in")] == ["small.txt"]

    asyncio.run(scenario())


@namespace_only
def test_on_behalf_of_is_checked_and_audited_for_sync_handles_too(mvm_home: object) -> None:
    import json
    from pathlib import Path

    before = {s.id for s in mvm.Sandbox.list()}
    with pytest.raises(mvm.InvalidArgument) as bad:
        mvm.Sandbox.create(TEMPLATE, backend="namespace", on_behalf_of={"client": 7})  # type: ignore[dict-item]
    assert bad.value.field == "on_behalf_of"
    assert {s.id for s in mvm.Sandbox.list()} == before
    principal = {"via": "test", "client": "sync-caller"}
    with mvm.Sandbox.create(TEMPLATE, backend="namespace", ttl="5m", on_behalf_of=principal) as sb:
        sb.commands.run(["true"])
    audit = Path(str(mvm_home)) / "audit" / f"{sb.id}.jsonl"
    entries = {e["op"]: e for e in map(json.loads, audit.read_text().splitlines())}
    for op in ("sandbox.create", "exec.run", "sandbox.destroy"):
        assert entries[op]["actor"]["on_behalf_of"] == principal, entries[op]
        assert {"pid", "uid", "user"} <= set(entries[op]["actor"])
