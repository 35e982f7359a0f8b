"""Record/plan mode for asyncio scripts: ``mvm.AsyncSandbox`` over the record transport
gives the recording -- and so the IR -- its sync twin gives, byte for byte. Nothing boots."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from modes_helpers import assert_nothing_booted, run_mvmctl

import mvm
from mvm import errors
from mvm.modes.recording import reset_recording

# One workload, written twice: every recorded operation, a file and a stdin larger than
# one frame (chunked write, staged stdin), secret references, a recorded snapshot.
SYNC_SCRIPT = """
import mvm

BIG = b"x" * (3 * 1024 * 1024 + 7)
with mvm.Sandbox.create("python-3.13", workload_id="twins", include=["src"], ttl="1h",
                        resources=mvm.resources(cpu_cores=2, memory_mb=256),
                        network=mvm.network("allow", ["pypi.org:443"]),
                        env={"MODE": "dev", "TOKEN": mvm.secret("api-key")}, tags={"team": "a"},
                        auto_pause="5m", on_behalf_of={"client": "twin"}) as sb:
    sb.files.write("/app/main.py", "print('hi')", mode=0o755)
    sb.files.write("/app/big.bin", BIG)
    sb.files.mkdir("/work")
    sb.files.move("/app/main.py", "/work/main.py", overwrite=True)
    sb.commands.run(["python", "/work/main.py"], env={"K": mvm.secret("db-pass")}, cwd="/work", check=True)
    sb.commands.run("wc -c", stdin=BIG, timeout_seconds=5, max_output_bytes=1024)
    proc = sb.commands.start(["cat"], stdin=True, auto_resume=True)
    proc.send_stdin("line\\n")
    proc.close_stdin()
    proc.signal("SIGINT", group=False)
    proc.kill()
    sb.pause()
    snap = sb.snapshot(name="s1", expires="2h", keep=True)
    sb.resume(snapshot=snap)
    sb.stop()
    sb.start()
    sb.files.remove("/work", recursive=True)
"""

ASYNC_SCRIPT = """
import asyncio
import mvm

BIG = b"x" * (3 * 1024 * 1024 + 7)
async def main():
    async with await mvm.AsyncSandbox.create("python-3.13", workload_id="twins", include=["src"], ttl="1h",
                            resources=mvm.resources(cpu_cores=2, memory_mb=256),
                            network=mvm.network("allow", ["pypi.org:443"]),
                            env={"MODE": "dev", "TOKEN": mvm.secret("api-key")}, tags={"team": "a"},
                            auto_pause="5m", on_behalf_of={"client": "twin"}) as sb:
        await sb.files.write("/app/main.py", "print('hi')", mode=0o755)
        await sb.files.write("/app/big.bin", BIG)
        await sb.files.mkdir("/work")
        await sb.files.move("/app/main.py", "/work/main.py", overwrite=True)
        await sb.commands.run(["python", "/work/main.py"], env={"K": mvm.secret("db-pass")}, cwd="/work", check=True)
        await sb.commands.run("wc -c", stdin=BIG, timeout_seconds=5, max_output_bytes=1024)
        proc = await sb.commands.start(["cat"], stdin=True, auto_resume=True)
        await proc.send_stdin("line\\n")
        await proc.close_stdin()
        await proc.signal("SIGINT", group=False)
        await proc.kill()
        await sb.pause()
        snap = await sb.snapshot(name="s1", expires="2h", keep=True)
        await sb.resume(snapshot=snap)
        await sb.stop()
        await sb.start()
        await sb.files.remove("/work", recursive=True)

asyncio.run(main())
"""


@pytest.fixture(autouse=True)
def _nothing_boots(home: Path):
    yield
    assert_nothing_booted(home)


def test_async_script_compiles_to_the_sync_scripts_ir(home: Path, write_script, tmp_path: Path) -> None:
    outputs = {}
    for name, body in (("sync_twin.py", SYNC_SCRIPT), ("async_twin.py", ASYNC_SCRIPT)):
        out = tmp_path / name.removesuffix(".py")
        proc = run_mvmctl("compile", str(write_script(body, name=name)), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        outputs[name] = out
    sync_bytes = (outputs["sync_twin.py"] / "workload.json").read_bytes()
    assert (outputs["async_twin.py"] / "workload.json").read_bytes() == sync_bytes
    doc = json.loads(sync_bytes)
    assert (doc["auto_pause_seconds"], doc["on_behalf_of"]) == (300, {"client": "twin"})
    assert [op["op"] for op in doc["operations"]] == [
        "files.write", "files.write", "files.mkdir", "files.move", "commands.run", "commands.run",
        "commands.start", "process.stdin", "process.close_stdin", "process.signal", "process.signal",
        "sandbox.pause", "sandbox.snapshot", "sandbox.resume", "sandbox.stop", "sandbox.start", "files.remove",
        "sandbox.destroy"]
    run = doc["operations"][5]
    assert run["argv"] == ["/bin/sh", "-c", "wc -c"] and run["stdin_sha256"]  # staged stdin stays the run's stdin
    assert (outputs["async_twin.py"] / "files" / run["stdin_sha256"]).stat().st_size == 3 * 1024 * 1024 + 7
    assert doc["operations"][4]["check"] is True and doc["operations"][4]["env"] == {
        "K": {"kind": "secret_ref", "name": "db-pass"}}
    files = sorted(p.name for p in (outputs["async_twin.py"] / "files").iterdir())
    assert files == sorted(p.name for p in (outputs["sync_twin.py"] / "files").iterdir())


def test_async_script_plans_like_the_sync_one(home: Path, write_script) -> None:
    env = {"MVM_SECRET_API_KEY": "k", "MVM_SECRET_DB_PASS": "p"}
    reports = {}
    for name, body in (("sync_twin.py", SYNC_SCRIPT), ("async_twin.py", ASYNC_SCRIPT)):
        proc = run_mvmctl("run", "--mode", "plan", str(write_script(body, name=name)), "--json", env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reports[name] = json.loads(proc.stdout)
    sync, asynchronous = reports["sync_twin.py"], reports["async_twin.py"]
    assert asynchronous["admitted"] is True
    assert [w["workload_sha256"] for w in asynchronous["workloads"]] == [
        w["workload_sha256"] for w in sync["workloads"]]


# ---- in-process: the same handle classes, the same refusals ---------------------------------------


@pytest.fixture
def rec(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MVM_INCLUDE_BASE", str(tmp_path))
    monkeypatch.setenv("MVM_MODE", "record")
    recording = reset_recording()
    yield recording
    reset_recording()


def test_async_create_records_and_answers_like_sync(rec) -> None:
    async def script() -> None:
        sb = await mvm.AsyncSandbox.create("python-3.13", workload_id="w")
        assert type(sb) is mvm.AsyncSandbox and sb.recorded and sb.mode == "record"
        result = await sb.commands.run(["true"], check=True)  # no exit code: check has nothing to refuse
        assert result.recorded and result.exit_code is None
        proc = await sb.commands.start(["sleep", "1"])
        assert type(proc) is mvm.AsyncProcess and proc.recorded and proc.pid is None
        info = await sb.describe()
        assert info.state == "running" and info.details["recorded"] is True
        await sb.kill()
        await sb.kill()  # twice is fine, recorded once

    asyncio.run(script())
    assert [e["op"] for e in rec.events] == ["sandbox.create", "commands.run", "commands.start", "sandbox.destroy"]
    assert rec.events[1]["at"].startswith("test_async_modes.py:")


def test_concurrent_tasks_record_in_the_order_they_call(rec) -> None:
    async def script() -> None:
        sb = await mvm.AsyncSandbox.create("python-3.13")
        await asyncio.gather(*(sb.commands.run(["echo", str(i)]) for i in range(20)))

    asyncio.run(script())
    assert [e["argv"][1] for e in rec.events[1:]] == [str(i) for i in range(20)]


async def _drain(iterator) -> None:
    async for _ in iterator:
        pass


@pytest.mark.parametrize("call, name", [
    (lambda sb: sb.files.read("/app/x"), "files.read"),
    (lambda sb: sb.files.read_text("/app/x"), "files.read_text"),
    (lambda sb: sb.files.list("/app"), "files.list"),
    (lambda sb: sb.files.exists("/app/x"), "files.exists"),
    (lambda sb: sb.commands.list(), "commands.list"),
    (lambda sb: sb.commands.connect(12), "commands.connect"),
    (lambda sb: sb.ports.forward(guest_port=8000), "ports.forward"),
    (lambda sb: sb.network.update(["pypi.org:443"]), "network.update"),
    (lambda sb: _drain(sb.logs()), "Sandbox.logs"),
    (lambda sb: mvm.AsyncSandbox.connect("other"), "Sandbox.connect"),
    (lambda sb: mvm.AsyncSandbox.list(), "Sandbox.list"),
])
def test_async_reads_say_they_cannot_be_recorded(rec, call, name) -> None:
    async def script() -> None:
        sb = await mvm.AsyncSandbox.create("python-3.13")
        await call(sb)

    with pytest.raises(errors.NotAvailableInRecordMode) as exc:
        asyncio.run(script())
    assert exc.value.details["call"] == name and "record mode" in str(exc.value)


def test_async_process_reads_say_they_cannot_be_recorded(rec) -> None:
    async def script() -> None:
        sb = await mvm.AsyncSandbox.create("python-3.13")
        proc = await sb.commands.start(["true"])
        for call, name in ((proc.wait, "Process.wait"), (proc.info, "Process.info"),
                           (lambda: _drain(proc.lines()), "Process.lines")):
            with pytest.raises(errors.NotAvailableInRecordMode) as exc:
                await call()
            assert exc.value.details["call"] == name

    asyncio.run(script())
