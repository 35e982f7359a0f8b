"""mvm.AsyncSandbox on real sandboxes (namespace backend: many at once stay cheap;
the shared request builders are covered on the VM by the sync SDK's conformance tests)."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

import mvm
from mvm.backends import availability

TEMPLATE = "python-3.13"

pytestmark = pytest.mark.skipif(not availability("namespace").ok, reason="namespace backend unavailable here")


async def _create(**kwargs: object) -> mvm.AsyncSandbox:
    return await mvm.AsyncSandbox.create(
        TEMPLATE, backend="namespace", ttl="10m", resources=mvm.resources(cpu_cores=1, memory_mb=256), **kwargs
    )


async def _wait_until(predicate: object, what: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


def test_surface_commands_files_processes_logs() -> None:
    async def scenario() -> None:
        async with await _create() as sandbox:
            entry = await sandbox.files.write("/app/main.py", "import sys\nprint('hi', sys.argv[1])\n")
            assert entry.size == len("import sys\nprint('hi', sys.argv[1])\n")
            result = await sandbox.commands.run(["python", "/app/main.py", "async"])
            assert (result.exit_code, result.stdout) == (0, "hi async\n")
            assert result.audit_id and result.audit_id.startswith("aud_")

            big = os.urandom(3 * 1024 * 1024 + 17)  # more than one frame: the chunked write path
            await sandbox.files.write("/app/big.bin", big)
            assert await sandbox.files.read("/app/big.bin") == big
            with pytest.raises(mvm.errors.TooLarge):
                await sandbox.files.read("/app/big.bin", max_bytes=1024)
            names = [e.name for e in await sandbox.files.list("/app")]
            assert names == ["big.bin", "main.py"]
            with pytest.raises(mvm.FileNotFoundInSandbox):
                await sandbox.files.read("/app/missing")

            # More requests at once than the supervisor takes per connection: the rest queue.
            many = await asyncio.gather(*(sandbox.commands.run(["echo", str(i)]) for i in range(100)))
            assert [r.stdout for r in many] == [f"{i}\n" for i in range(100)]

            echoed = await sandbox.commands.run(["wc", "-c"], stdin=big)  # staged stdin, bigger than a frame
            assert echoed.stdout.strip() == str(len(big))

            process = await sandbox.commands.start(["sh", "-c", "for i in 1 2 3; do echo line $i; done; exit 7"])
            lines = [line async for line in process.lines("stdout")]
            assert lines == ["line 1\n", "line 2\n", "line 3\n"]
            assert await process.wait() == 7

            with pytest.raises(mvm.CommandError):
                await sandbox.commands.run(["false"], check=True)
            with pytest.raises(mvm.InvalidArgument) as bad:
                await sandbox.commands.run([])
            assert bad.value.field == "argv"
            with pytest.raises(mvm.InvalidArgument):
                await sandbox.files.write("relative/path", "x")

            messages = [event.message async for event in sandbox.logs()]
            assert any("hi async" in message for message in messages)
            info = await sandbox.describe()
            assert info.id == sandbox.id and info.state == "running"
            listed = {s.id for s in await mvm.AsyncSandbox.list()}
            assert sandbox.id in listed
            other = await mvm.AsyncSandbox.connect(sandbox.name)
            assert (await other.files.read("/app/main.py")).startswith(b"import sys")
            await other.close()
        assert sandbox.id not in {s.id for s in await mvm.AsyncSandbox.list()}

    asyncio.run(scenario())


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

            await asyncio.gather(*(command(i) for i in range(200)), *(transfer(i) for i in range(50)))
            assert finished.count("command") == 200 and finished.count("file") == 50
            # No starvation: file transfers are served among the commands, not after all of them.
            assert finished.index("file") < len(finished) - 1 - finished[::-1].index("command")
            # Every sandbox's files arrived whole (checked inside the guest too).
            sums = await sandboxes[3].commands.run(["sha256sum", "/tmp/t3", "/tmp/t13"])
            assert hashlib.sha256(payloads[3]).hexdigest() in sums.stdout
            assert hashlib.sha256(payloads[13]).hexdigest() in sums.stdout
        finally:
            await asyncio.gather(*(sandbox.kill() for sandbox in sandboxes))

    asyncio.run(scenario())


def test_cancelling_a_run_kills_its_process_and_leaves_the_handle_usable() -> None:
    async def scenario() -> None:
        async with await _create() as sandbox:
            task = asyncio.create_task(
                sandbox.commands.run(["sh", "-c", "echo $$ > /tmp/pid; exec sleep 300"], timeout_seconds=None)
            )
            await _wait_until(lambda: sandbox.files.exists("/tmp/pid"), "the command to start")
            pid = int((await sandbox.files.read_text("/tmp/pid")).strip())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            async def gone() -> bool:
                probe = await sandbox.commands.run(["sh", "-c", f"kill -0 {pid} 2>/dev/null"])
                return probe.exit_code != 0

            await _wait_until(gone, "the cancelled command's process to be killed")
            processes = await sandbox.commands.list()
            assert not [p for p in processes if p.pid == pid and p.running]
            again = await sandbox.commands.run(["echo", "still here"])
            assert again.stdout == "still here\n"

    asyncio.run(scenario())


def test_a_reader_of_a_silent_process_times_out_and_the_process_lives_on() -> None:
    async def scenario() -> None:
        async with await _create() as sandbox:
            process = await sandbox.commands.start(["sh", "-c", "echo ready; exec sleep 300"])
            seen: list[str] = []
            with pytest.raises(mvm.StreamIdle) as idle:
                async for stream, text in process.output(idle_timeout=1.0):
                    assert stream == "stdout"
                    seen.append(text)
            assert seen == ["ready\n"]
            assert isinstance(idle.value, TimeoutError)
            assert await process.is_running()
            await process.kill()
            assert await process.wait() == 128 + 9

            with pytest.raises(mvm.StreamIdle):
                async for _ in sandbox.logs(follow=True, since=1e12, idle_timeout=0.5):
                    pass

    asyncio.run(scenario())


def test_record_and_plan_modes_refuse_rather_than_create_live(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_MODE", "record")
    before = {s.id for s in mvm.Sandbox.list()}
    with pytest.raises(mvm.errors.NotAvailableInRecordMode):
        asyncio.run(_create())
    assert {s.id for s in mvm.Sandbox.list()} == before
