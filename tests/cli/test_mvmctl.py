"""mvmctl end to end: the real binary against a real sandbox (namespace backend: fast)."""

from __future__ import annotations

import json
import os
import time
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mvm.cli.main import cli
from mvm.durations import parse_duration
from mvm.modes.node import node_env
from mvm.spec import DEFAULT_TEMPLATE, DEFAULT_TTL, NetworkPolicy, Resources

MVMCTL = [sys.executable, "-m", "mvm.cli.main"]


def mvmctl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*MVMCTL, *args], capture_output=True, text=True, input=input, timeout=180, env={**os.environ}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mvmctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def box() -> Iterator[str]:
    up = json.loads(
        mvmctl(
            "up", "--name", "cli-box", "--backend", "namespace", "--ttl", "15m", "--env", "GREETING=hi", "--json"
        ).stdout
    )
    assert up["name"] == "cli-box" and up["isolation"] == "namespace"
    yield "cli-box"
    mvmctl("down", "cli-box", check=False)


def test_exec_passes_exit_status_and_output(box: str) -> None:
    proc = mvmctl("exec", box, "--", "sh", "-c", "echo $GREETING; echo err >&2; exit 7", check=False)
    assert proc.returncode == 7
    assert proc.stdout == "hi\n" and proc.stderr == "err\n"


def test_exec_json_gives_the_result_with_audit_id(box: str) -> None:
    result = json.loads(mvmctl("exec", box, "--json", "--", "echo", "x").stdout)
    assert result["exit_code"] == 0 and result["stdout"] == "x\n" and result["audit_id"].startswith("aud_")


def test_exec_user_relative_cwd_and_stdin(box: str) -> None:
    proc = mvmctl("exec", box, "--user", "nobody", "--cwd", "tmp", "--stdin", "--", "sh", "-c", "id -un; pwd; cat",
                  input="fed\0in")
    assert proc.stdout == "nobody\n/tmp\nfed\0in"
    unknown = mvmctl("exec", box, "--user", "no-such-account", "--", "id", check=False)
    assert unknown.returncode == 2 and "no-such-account" in unknown.stderr


def test_fs_verbs(box: str) -> None:
    mvmctl("fs", "write", box, "/work/in.txt", input="from stdin")
    mvmctl("fs", "write", box, "/work/c.txt", "--content", "inline")
    assert mvmctl("fs", "read", box, "/work/in.txt").stdout == "from stdin"
    names = [e["name"] for e in json.loads(mvmctl("fs", "ls", box, "/work", "--json").stdout)]
    assert names == ["c.txt", "in.txt"]
    assert json.loads(mvmctl("fs", "stat", box, "/work/c.txt", "--json").stdout)["size"] == 6
    mvmctl("fs", "mkdir", box, "/work/d/e")
    mvmctl("fs", "mv", box, "/work/c.txt", "/work/d/e/c.txt")
    mvmctl("fs", "rm", box, "/work/d", "--recursive")
    missing = mvmctl("fs", "read", box, "/work/d/e/c.txt", check=False)
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "/work/d/e/c.txt" in missing.stderr


def test_fs_verbs_as_a_guest_user(box: str) -> None:
    mvmctl("fs", "write", box, "/tmp/root-only", "--content", "root's", "--mode", "600")
    denied = mvmctl("fs", "read", box, "/tmp/root-only", "--user", "nobody", check=False)
    assert denied.returncode == 2 and "Permission denied" in denied.stderr and "/tmp/root-only" in denied.stderr
    mvmctl("fs", "write", box, "/tmp/cli-nobody/made.txt", "--content", "mine", "-u", "nobody")
    assert mvmctl("fs", "read", box, "/tmp/cli-nobody/made.txt", "-u", "nobody").stdout == "mine"
    assert mvmctl("exec", box, "--", "stat", "-c", "%U", "/tmp/cli-nobody/made.txt").stdout == "nobody\n"
    mvmctl("fs", "rm", box, "/tmp/cli-nobody", "--recursive", "--user", "nobody")
    unknown = mvmctl("fs", "ls", box, "/tmp", "--user", "no-such-account", check=False)
    assert unknown.returncode == 2 and "no-such-account" in unknown.stderr and "Traceback" not in unknown.stderr


def test_proc_verbs(box: str) -> None:
    pid = mvmctl("proc", "start", box, "--", "sleep", "60").stdout.strip()
    listed = json.loads(mvmctl("proc", "ls", box, "--json").stdout)
    assert int(pid) in [p["pid"] for p in listed]
    mvmctl("proc", "kill", box, pid)
    assert mvmctl("proc", "wait", box, pid, check=False).returncode == 137 % 256


def test_logs_and_describe_and_ls(box: str) -> None:
    mvmctl("exec", box, "--", "echo", "cli-log-marker")
    logs = [json.loads(line) for line in mvmctl("logs", box, "--json").stdout.splitlines()]
    assert any(e["message"] == "cli-log-marker" for e in logs)
    assert json.loads(mvmctl("describe", box, "--json").stdout)["state"] == "running"
    assert box in [s["name"] for s in json.loads(mvmctl("ls", "--json").stdout)]


def test_user_errors_are_one_line_without_traceback() -> None:
    proc = mvmctl("exec", "no-such-box", "--", "true", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = mvmctl("up", "--template", "python-3.12", check=False)
    assert proc.returncode == 2 and "python-3.13" in proc.stderr and "Traceback" not in proc.stderr


def test_template_ls_and_doctor() -> None:
    available = json.loads(mvmctl("template", "ls", "--available", "--json").stdout)
    assert "python-3.13" in available and "python-3.12" not in available
    report = json.loads(mvmctl("doctor", "--json").stdout)
    assert report["namespace"]["ok"] is True
    assert "vm" in report and "default_backend" in report


def test_defaults_are_the_spec_s_and_reach_a_node_script() -> None:
    # what the TypeScript SDK applies where a create names nothing: asked of Python, never copied
    shown = json.loads(mvmctl("defaults", "--json").stdout)
    assert shown == {"template": DEFAULT_TEMPLATE, "ttl_seconds": parse_duration(DEFAULT_TTL),
                     "resources": Resources().to_json(), "network": NetworkPolicy().to_json()}
    assert json.loads(node_env({})["MVM_CREATE_DEFAULTS"]) == shown


def test_down_all(tmp_path: Path) -> None:
    mvmctl("up", "--name", "cli-doomed", "--backend", "namespace")
    out = json.loads(mvmctl("down", "cli-doomed", "--json").stdout)
    assert out["destroyed"] == ["cli-doomed"]
    assert "cli-doomed" not in [s["name"] for s in json.loads(mvmctl("ls", "--json").stdout)]


def test_up_auto_pause() -> None:
    proc = mvmctl("up", "--name", "cli-napper", "--backend", "namespace", "--auto-pause", "soon", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: auto_pause:") and "30m" in proc.stderr
    info = json.loads(mvmctl("up", "--name", "cli-napper", "--backend", "namespace", "--auto-pause", "2m",
                             "--json").stdout)
    try:
        assert info["details"]["auto_pause_seconds"] == 120 and info["details"]["paused_by_idle"] is False
    finally:
        mvmctl("down", "cli-napper")


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))


def test_every_command_s_help() -> None:
    # The command modules import their heavy parts (SDK, modes, templates, security) inside
    # the commands. `mvmctl --help`, through the console script users and the TypeScript SDK
    # run, loads every command module and lists each command with its help; --help of each
    # command and subcommand shows its options still build.
    entry_point = Path(sys.executable).with_name("mvmctl")
    assert entry_point.exists(), f"{entry_point}: the package's console script is not installed"
    top = subprocess.run([str(entry_point), "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and top.stderr == "", top.stderr
    listed = top.stdout.split("Commands:\n", 1)[1].splitlines()
    paths = list(_command_paths(cli))
    assert len(paths) > 40
    runner = CliRunner()
    for path, command in paths:
        result = runner.invoke(cli, [*path, "--help"], prog_name="mvmctl")
        assert result.exit_code == 0, (path, result.output)
        assert result.output.startswith(f"Usage: mvmctl {' '.join(path)} "), (path, result.output)
        assert (command.help or "").split("\n")[0].strip()[:30] in result.output, path
        if len(path) == 1 and not command.hidden:  # the top-level listing names it, with its help
            line = next((row for row in listed if row.split()[:1] == [path[0]]), None)
            assert line is not None and command.get_short_help_str(limit=45)[:20] in line, (path, listed)


def test_start_up_loads_no_command_s_heavy_parts() -> None:
    # What keeps `mvmctl` start-up short (every TypeScript create runs `mvmctl up`): building
    # the command tree and printing help load none of these; the commands load them when run.
    heavy = ["jsonschema", "cryptography", "mvm.sdk.sandbox", "mvm.sdk.pool", "mvm.templates.builder",
             "mvm.templates.oci", "mvm.modes.ir", "mvm.modes.runner", "mvm.security.audit", "mvm.supervisor.client"]
    code = ("import sys\nfrom mvm.cli.main import cli\n"
            "try:\n    cli(['--help'], prog_name='mvmctl')\nexcept SystemExit:\n    pass\n"
            "print('LOADED', ' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(proc.stdout.rsplit("LOADED ", 1)[1].split())
    assert "mvm.cli.sandboxes" in loaded and "mvm.cli.modes" in loaded
    assert [name for name in heavy if name in loaded] == []
    # ... and a command that needs one still gets it
    listed = mvmctl("ls", "--json")
    assert isinstance(json.loads(listed.stdout), list)


def test_receipt_prune_removes_old_receipts_and_names_a_bad_duration(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.security.receipts import write_receipt

    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    folder = tmp_path / "receipts"
    now = time.time()
    paths = [write_receipt(folder, sandbox_id="sb-1", template="t", template_digest=None, argv=["true"],
                           env_keys=[], exit_code=0, stdout=b"", stderr=b"", started_at=now, ended_at=now,
                           audit_id=None, truncated=False) for _ in range(3)]
    os.utime(paths[0], (now - 8 * 86400, now - 8 * 86400))
    bad = mvmctl("receipt", "prune", "--older-than", "a week", check=False)
    assert bad.returncode == 2 and "older_than" in bad.stderr and "7d" in bad.stderr
    dry = json.loads(mvmctl("receipt", "prune", "--older-than", "7d", "--dry-run", "--json").stdout)
    assert (dry["removed"], dry["kept"], dry["dry_run"]) == (1, 2, True) and paths[0].exists()
    done = mvmctl("receipt", "prune", "--older-than", "1w")
    assert "removed 1 receipt(s)" in done.stdout and "kept 2" in done.stdout
    assert sorted(folder.iterdir()) == sorted(paths[1:])


def test_create_server_answers_each_request_by_its_id_and_ends_at_the_end_of_its_input() -> None:
    """``mvmctl create-server`` (the TypeScript SDK's create path; its real creates are
    tests/typescript's): ``up``'s options check each request's arguments, every request gets
    one answer naming its id, and the end of stdin ends the server with status 0."""
    requests = "\n".join([
        json.dumps({"id": 1, "args": ["--cpus", "many"]}),
        "not json",
        json.dumps({"id": 2, "args": "--name x"}),
        json.dumps({"id": 3, "args": ["--from-ir", "/", "--name", "x"]}),
        json.dumps({"id": 4, "args": ["--no-such-option"]}),
        json.dumps({"id": 5, "args": ["--help"]}),
    ]) + "\n"
    proc = subprocess.run([*MVMCTL, "create-server"], input=requests, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers = {a["id"]: a["error"] for a in map(json.loads, proc.stdout.splitlines())}
    assert set(answers) == {1, None, 2, 3, 4, 5} and all(e["type"] == "InvalidArgument" for e in answers.values())
    assert answers[1]["field"] == "cpus" and "many" in answers[1]["message"]
    assert answers[None]["field"] == "request" and answers[2]["field"] == "request"
    assert "--from-ir" in answers[3]["message"]
    assert "--no-such-option" in answers[4]["message"]
