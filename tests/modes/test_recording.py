"""Record mode in-process: the live Sandbox over a record transport, recorded in order, validated
like the live path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mvm
from mvm import errors
from mvm.modes.recording import current_recording, reset_recording
from mvm.security.secrets import Keystore

from modes_helpers import CANARY, assert_nothing_booted


@pytest.fixture
def rec(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    base = tmp_path / "base"
    (base / "src").mkdir(parents=True)
    (base / "src" / "a.py").write_text("print('a')\n")
    (base / "src" / "b.txt").write_bytes(b"\x00\x01")
    monkeypatch.setenv("MVM_INCLUDE_BASE", str(base))
    recording = reset_recording()
    yield recording
    reset_recording()
    assert_nothing_booted(home)


def _in_record_mode(call):
    """What a script run by `mvmctl compile` sees: $MVM_MODE=record."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MVM_MODE", "record")
        return call()


def create(**kw):
    kw.setdefault("mode", "record")
    return mvm.Sandbox.create("python-3.13", **kw)


def test_create_in_record_mode_returns_a_recorded_sandbox(rec) -> None:
    sb = create(workload_id="agent-tool", include=["src"], resources=mvm.resources(cpu_cores=2, memory_mb=256))
    assert type(sb) is mvm.Sandbox and sb.mode == "record" and sb.recorded
    info = sb.describe()
    assert info.state == "running" and info.details["recorded"] is True
    assert info.resources["memory_mb"] == 256
    assert sb.network.policy()["mode"] == "deny"  # what was asked is known; changing it needs a live one
    event = rec.events[0]
    assert event["op"] == "sandbox.create" and event["template"] == "python-3.13"
    assert [f["path"] for f in event["include"]["files"]] == ["src/a.py", "src/b.txt"]
    assert event["ttl_seconds"] == 1800 and event["at"].startswith("test_recording.py:")


def test_auto_pause_and_on_behalf_of_are_recorded_and_reach_the_ir(rec) -> None:
    """Every create path honours them: a recording keeps them for the replay to create with."""
    from mvm.modes.ir import build_ir

    sb = create(auto_pause="5m", on_behalf_of={"client": "inspector", "via": "mcp"})
    assert sb.describe().details["auto_pause_seconds"] == 300  # as a live describe() says it
    plain = create()
    create_events = [e for e in rec.events if e["op"] == "sandbox.create"]
    assert create_events[0]["auto_pause_seconds"] == 300
    assert create_events[0]["on_behalf_of"] == {"client": "inspector", "via": "mcp"}
    doc = build_ir(rec, 0)
    assert (doc["auto_pause_seconds"], doc["on_behalf_of"]) == (300, {"client": "inspector", "via": "mcp"})
    assert plain.describe().details["auto_pause_seconds"] is None
    defaults = build_ir(rec, 1)  # unset: absent, so documents from before these fields keep their hash
    assert "auto_pause_seconds" not in defaults and "on_behalf_of" not in defaults


def test_mode_choice_explicit_beats_env(rec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_MODE", "plan")
    assert mvm.Sandbox.create("python-3.13").mode == "plan"
    assert mvm.Sandbox.create("python-3.13", mode="record").mode == "record"
    monkeypatch.setenv("MVM_MODE", "bogus")
    with pytest.raises(errors.InvalidArgument) as exc:
        mvm.Sandbox.create("python-3.13")
    assert exc.value.field == "mode"


def test_commands_run_is_recorded_never_invented(rec) -> None:
    sb = create()
    result = sb.commands.run(["python", "-V"], timeout_seconds=30, env={"A": "1"}, cwd="/app", stdin="in")
    assert result.recorded is True and result.exit_code is None
    assert (result.stdout, result.stderr, result.audit_id, result.duration_seconds) == ("", "", None, 0.0)
    event = rec.events[-1]
    assert event["op"] == "commands.run" and event["argv"] == ["python", "-V"]
    assert event["env"] == {"A": {"kind": "literal", "value": "1"}} and event["cwd"] == "/app"
    assert event["timeout_seconds"] == 30 and rec.blob(event["stdin_sha256"]) == b"in"
    shell = sb.commands.run("echo hi")
    assert shell.recorded and rec.events[-1]["argv"] == ["/bin/sh", "-c", "echo hi"]


def test_commands_start_gives_a_recorded_process(rec) -> None:
    sb = create()
    proc = sb.commands.start(["sleep", "100"], stdin=True)
    assert type(proc) is mvm.Process and proc.recorded and proc.pid is None
    proc.send_stdin("data")
    proc.close_stdin()
    proc.signal("SIGTERM")
    proc.kill()
    ops = [(e["op"], e.get("process"), e.get("signal")) for e in rec.events[1:]]
    assert ops == [("commands.start", 0, None), ("process.stdin", 0, None), ("process.close_stdin", 0, None),
                   ("process.signal", 0, "TERM"), ("process.signal", 0, "KILL")]
    for call in (proc.wait, proc.is_running, proc.info):
        with pytest.raises(errors.NotAvailableInRecordMode):
            call()
    with pytest.raises(errors.NotAvailableInRecordMode, match=r"Process\.exit_code"):
        _ = proc.exit_code
    with pytest.raises(errors.InvalidArgument, match="signal"):
        proc.signal("SIGWHAT")


@pytest.mark.parametrize("call, name", [
    (lambda sb: sb.files.read("/app/x"), "files.read"),
    (lambda sb: sb.files.read_text("/app/x"), "files.read_text"),
    (lambda sb: sb.files.list("/app"), "files.list"),
    (lambda sb: sb.files.stat("/app/x"), "files.stat"),
    (lambda sb: sb.files.exists("/app/x"), "files.exists"),
    (lambda sb: sb.logs(), "Sandbox.logs"),
    (lambda sb: sb.commands.list(), "commands.list"),
    (lambda sb: sb.commands.connect(12), "commands.connect"),
    (lambda sb: _in_record_mode(lambda: mvm.Sandbox.connect("other")), "Sandbox.connect"),
    (lambda sb: _in_record_mode(mvm.Sandbox.list), "Sandbox.list"),
    (lambda sb: sb.ports.forward(guest_port=8000), "ports.forward"),
    (lambda sb: sb.network.update(["pypi.org:443"]), "network.update"),
    (lambda sb: list(sb.commands.start(["true"]).stdout), "Process.stdout"),
    # the workload IR has no user field: acting as another user is refused, never silently dropped
    (lambda sb: sb.commands.run(["id"], user="nobody"), "commands.run"),
    (lambda sb: sb.files.write("/app/x", "y", user="nobody"), "files.write"),
    (lambda sb: sb.files.write("/app/x", b"y" * (2 << 20), user="nobody"), "files.write"),
    (lambda sb: sb.files.mkdir("/app/d", user="nobody"), "files.mkdir"),
    (lambda sb: sb.files.remove("/app/x", user="nobody"), "files.remove"),
    (lambda sb: sb.files.move("/app/x", "/app/y", user="nobody"), "files.move"),
])
def test_reads_say_they_cannot_be_recorded(rec, call, name) -> None:
    sb = create()
    with pytest.raises(errors.NotAvailableInRecordMode) as exc:
        call(sb)
    assert name in str(exc.value) and "record mode" in str(exc.value)
    assert exc.value.details["call"] == name


def test_every_call_is_recorded_in_order(rec) -> None:
    sb = create()
    sb.files.write("/app/main.py", "print(1)")
    sb.files.mkdir("/work")
    sb.files.move("/app/main.py", "/work/main.py")
    sb.files.remove("/work", recursive=True)
    sb.pause()
    snap = sb.snapshot(name="s", expires="1h")
    sb.resume(snapshot=snap)
    sb.stop()
    sb.start()
    sb.kill()
    sb.kill()  # twice is fine, recorded once
    ops = [e["op"] for e in rec.events if e.get("sandbox") == 0]
    assert ops == ["sandbox.create", "files.write", "files.mkdir", "files.move", "files.remove", "sandbox.pause",
                   "sandbox.snapshot", "sandbox.resume", "sandbox.stop", "sandbox.start", "sandbox.destroy"]
    assert rec.events[6]["expires_seconds"] == 3600
    assert rec.events[7]["snapshot"] == {"recorded": 0}
    assert [e["seq"] for e in rec.events] == list(range(len(rec.events)))
    with pytest.raises(errors.InvalidState, match="destroyed"):
        sb.files.write("/app/x", "y")


def test_context_manager_records_the_kill(rec) -> None:
    with create() as sb:
        sb.commands.start(["python", "/app/main.py"])
    assert rec.events[-1]["op"] == "sandbox.destroy"


def test_secret_refs_are_recorded_by_name_only(rec, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_SECRET_API_KEY", CANARY)
    Keystore().set("db-pass", CANARY + "-keystore")
    with create(env={"TOKEN": mvm.secret("db-pass")}) as sb:
        sb.commands.start(["python", "x.py"], env={"API_KEY": mvm.secret("api-key")})
        sb.commands.run(["env"], env={"P": mvm.secret("db-pass")})
    text = json.dumps(rec.events)
    assert CANARY not in text
    assert rec.events[0]["env"] == {"TOKEN": {"kind": "secret_ref", "name": "db-pass"}}
    assert rec.events[1]["env"] == {"API_KEY": {"kind": "secret_ref", "name": "api-key"}}


def test_unset_secret_is_fine_to_record(rec) -> None:
    sb = create(env={"K": mvm.secret("never-set")})
    assert rec.events[0]["env"]["K"] == {"kind": "secret_ref", "name": "never-set"}
    sb.kill()


@pytest.mark.parametrize("kwargs, field", [
    ({"ttl": "forever"}, "ttl"),
    ({"name": "Bad Name"}, "name"),
    ({"workload_id": "  "}, "workload_id"),
    ({"resources": {"cpu_cores": 1}}, "resources"),
    ({"network": "deny"}, "network"),
    ({"env": {"X": 3}}, "env['X']"),
    ({"env": {"A=B": "x"}}, "env"),
    ({"tags": {"a": 1}}, "tags"),
    ({"include": "src"}, "include"),
    ({"include": ["../outside"]}, "include"),
    ({"include": ["missing"]}, "include"),
    ({"backend": "docker"}, "backend"),
    ({"auto_pause": "soon"}, "auto_pause"),
    ({"auto_pause": 0}, "auto_pause"),
    ({"on_behalf_of": {"client": 7}}, "on_behalf_of"),
    ({"on_behalf_of": {}}, "on_behalf_of"),
])
def test_create_validation_matches_the_live_path(rec, kwargs, field) -> None:
    with pytest.raises(errors.InvalidArgument) as recorded:
        create(**kwargs)
    assert recorded.value.field == field
    if "include" in kwargs or "backend" in kwargs:
        return  # the live path checks these after spec validation; the field is what matters
    with pytest.raises(errors.InvalidArgument) as live:
        mvm.Sandbox.create("python-3.13", mode="live", **kwargs)
    assert str(live.value) == str(recorded.value)
    assert rec.events == []


def test_unknown_template_lists_the_buildable_ones(rec) -> None:
    with pytest.raises(errors.TemplateNotFound) as exc:
        create_with = mvm.Sandbox.create
        create_with("python-3.12", mode="record")
    assert "python-3.13" in exc.value.available and "python-3.12" in str(exc.value)


def test_bad_resource_names_the_field() -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        mvm.resources(cpu_cores=-1)
    assert exc.value.field == "resources.cpu_cores"


@pytest.mark.parametrize("call, field", [
    (lambda sb: sb.commands.run([]), "argv"),
    (lambda sb: sb.commands.run(["ls", 3]), "argv"),
    (lambda sb: sb.commands.run(["ls"], cwd=""), "cwd"),  # relative is allowed (from the default cwd)
    (lambda sb: sb.commands.run(["ls"], env={"K": 1}), "env['K']"),
    (lambda sb: sb.commands.run(["ls"], timeout_seconds=-1), "timeout_seconds"),
    (lambda sb: sb.commands.run(["ls"], max_output_bytes=0), "max_output_bytes"),
    (lambda sb: sb.commands.start(None), "argv"),
    (lambda sb: sb.files.write("relative/path", "x"), "path"),
    (lambda sb: sb.files.write("/app/x", 12), "data"),
    (lambda sb: sb.files.write("/app/x", "x", mode="644"), "mode"),
    (lambda sb: sb.files.remove("tmp"), "path"),
    (lambda sb: sb.snapshot(expires="soon"), "expires"),
])
def test_call_validation_names_the_field(rec, call, field) -> None:
    sb = create()
    before = len(rec.events)
    with pytest.raises(errors.InvalidArgument) as exc:
        call(sb)
    assert exc.value.field == field
    assert len(rec.events) == before  # a refused call is not recorded


def test_recording_is_process_wide(rec) -> None:
    a = create(workload_id="one")
    b = create(workload_id="two")
    a.commands.run(["true"])
    b.commands.run(["false"])
    assert current_recording() is rec
    assert [(e["sandbox"], e["op"]) for e in rec.events] == [
        (0, "sandbox.create"), (1, "sandbox.create"), (0, "commands.run"), (1, "commands.run")]
    assert a.name != b.name
