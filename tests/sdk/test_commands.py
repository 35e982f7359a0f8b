"""commands.run / commands.start on every backend."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from typing import Any

import pytest

import mvm


LIST_PROCESSES = (
    "import os\n"
    "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try: print(open(f'/proc/{pid}/cmdline').read().replace('\\0', ' '))\n"
    "    except OSError: pass\n"
)


def test_run_returns_typed_result_with_audit_id(sandbox: mvm.Sandbox) -> None:
    sandbox.files.write("/app/main.py", "print('hello from mvm')")
    result = sandbox.commands.run(["python", "/app/main.py"], timeout_seconds=30)
    assert isinstance(result, mvm.CommandResult)
    assert result.exit_code == 0
    assert result.stdout == "hello from mvm\n"
    assert result.stderr == ""
    assert result.audit_id and result.audit_id.startswith("aud_")
    assert result.duration_seconds > 0
    assert not result.truncated and not result.recorded


def test_audit_ids_are_unique_per_operation(sandbox: mvm.Sandbox) -> None:
    ids = {sandbox.commands.run(["true"]).audit_id for _ in range(5)}
    assert len(ids) == 5


def test_nonzero_exit_is_a_result_and_check_raises(sandbox: mvm.Sandbox) -> None:
    result = sandbox.commands.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert result.exit_code == 3
    assert result.stderr == "oops\n"
    with pytest.raises(mvm.CommandError) as info:
        sandbox.commands.run(["sh", "-c", "exit 4"], check=True)
    assert info.value.result.exit_code == 4


def test_string_command_runs_in_a_shell(sandbox: mvm.Sandbox) -> None:
    assert sandbox.commands.run("echo $((6*7)) | tr -d '\\n'").stdout == "42"


def test_missing_program_is_a_clear_error(sandbox: mvm.Sandbox) -> None:
    with pytest.raises(mvm.FileNotFoundInSandbox, match="no-such-program"):
        sandbox.commands.run(["no-such-program"])


def test_timeout_kills_the_whole_group_and_keeps_partial_output(sandbox: mvm.Sandbox) -> None:
    # sh, not python: a TCG guest on a loaded host takes ~2 s just to start python, and the
    # output before the timeout is what is checked
    script = "setsid sleep 300 & echo partial; exec sleep 299\n"
    sandbox.files.write("/tmp/slow.sh", script)
    with pytest.raises(mvm.CommandTimeout) as info:
        sandbox.commands.run(["sh", "/tmp/slow.sh"], timeout_seconds=2)
    assert info.value.stdout == "partial\n"
    # nothing keeps running: not the script, not its setsid'd sleep
    left = sandbox.commands.run(["python", "-c", LIST_PROCESSES])
    assert "sleep 300" not in left.stdout
    assert "sleep 299" not in left.stdout


def test_output_capture_is_capped_and_says_so(sandbox: mvm.Sandbox) -> None:
    result = sandbox.commands.run(["python", "-c", "print('x' * 100000)"], max_output_bytes=1000)
    assert result.truncated
    assert len(result.stdout) == 1000
    assert result.stdout_bytes == 100001


def test_callbacks_stream_output(sandbox: mvm.Sandbox) -> None:
    seen_out: list[str] = []
    seen_err: list[str] = []
    sandbox.commands.run(
        ["sh", "-c", "echo a; echo b >&2; echo c"], on_stdout=seen_out.append, on_stderr=seen_err.append
    )
    assert "".join(seen_out) == "a\nc\n"
    assert "".join(seen_err) == "b\n"


def test_stdin_is_passed_to_run(sandbox: mvm.Sandbox) -> None:
    assert sandbox.commands.run(["cat"], stdin="piped in").stdout == "piped in"


def test_env_per_command_and_no_host_env_leak(sandbox: mvm.Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_CANARY_VAR", "must-not-leak")
    out = sandbox.commands.run(["env"], env={"MODE": "dev"}).stdout
    assert "MODE=dev" in out
    assert "HOST_CANARY_VAR" not in out and "must-not-leak" not in out
    assert "PATH=" in out


def test_cwd(sandbox: mvm.Sandbox) -> None:
    sandbox.files.mkdir("/work/here")
    assert sandbox.commands.run(["pwd"], cwd="/work/here").stdout == "/work/here\n"
    # relative: taken from the default working directory "/"
    assert sandbox.commands.run(["pwd"], cwd="work/here").stdout == "/work/here\n"
    assert sandbox.commands.run(["pwd"]).stdout == "/\n"


def test_large_binary_stdin_reaches_the_process_intact(sandbox: mvm.Sandbox) -> None:
    small = b"\xc3\x28\x00\xff\x01 nul-bearing bytes"
    sandbox.commands.run(["sh", "-c", "cat > /tmp/stdin.bin"], stdin=small, check=True)
    assert sandbox.files.read("/tmp/stdin.bin") == small
    big = os.urandom(1024) * (50 * 1024)  # 50 MiB: more than one frame, staged as a guest file
    result = sandbox.commands.run(["wc", "-c"], stdin=big, timeout_seconds=180)
    assert result.stdout.strip() == str(len(big))
    digest = sandbox.commands.run(["sha256sum"], stdin=big, timeout_seconds=180).stdout.split()[0]
    assert digest == hashlib.sha256(big).hexdigest()
    assert sandbox.files.list("/tmp/.mvm-stdin") == []  # the staged copies are gone


def test_argv_of_a_mebibyte_round_trips(sandbox: mvm.Sandbox) -> None:
    chunk = "x" * (64 * 1024)
    result = sandbox.commands.run(["printf", "%s", *([chunk] * 16)])
    assert result.exit_code == 0 and result.stdout == chunk * 16


def test_run_as_another_user(sandbox: mvm.Sandbox) -> None:
    out = sandbox.commands.run(["sh", "-c", "id -un; id -u; echo $HOME"], user="nobody")
    assert out.stdout.split() == ["nobody", "65534", "/nonexistent"]
    assert sandbox.commands.run(["id", "-un"], user="0").stdout == "root\n"
    # the other user really lacks root's rights
    sandbox.files.write("/tmp/root-only", "secret", mode=0o600)
    denied = sandbox.commands.run(["cat", "/tmp/root-only"], user="nobody")
    assert denied.exit_code != 0 and "Permission denied" in denied.stderr


def test_unknown_user_is_a_typed_error_naming_it(sandbox: mvm.Sandbox) -> None:
    with pytest.raises(mvm.UserNotFound, match="no-such-account") as info:
        sandbox.commands.run(["id"], user="no-such-account")
    assert info.value.field == "user"
    with pytest.raises(mvm.InvalidArgument, match="user"):
        sandbox.commands.run(["id"], user="")


def test_self_sigterm_exits_143_and_is_not_a_timeout(sandbox: mvm.Sandbox) -> None:
    result = sandbox.commands.run(["sh", "-c", "kill -TERM $$"], timeout_seconds=30)
    assert result.exit_code == 143 and result.signal == 15


def test_timeout_kills_background_children_too(sandbox: mvm.Sandbox) -> None:
    with pytest.raises(TimeoutError):  # CommandTimeout is a TimeoutError
        sandbox.commands.run(["sh", "-c", "sleep 301 # bg-child & sleep 302 # fg-parent"], timeout_seconds=2)
    left = sandbox.commands.run(["python", "-c", LIST_PROCESSES]).stdout
    assert "sleep 301" not in left and "sleep 302" not in left


def test_start_wait_and_stdout_iteration(sandbox: mvm.Sandbox) -> None:
    p = sandbox.commands.start(
        ["python", "-c", "import time\nfor i in range(3):\n print('line', i, flush=True)\ntime.sleep(0.1)"],
        env={"MODE": "dev"},
    )
    assert p.pid > 0 and p.audit_id
    assert list(p.stdout) == ["line 0\n", "line 1\n", "line 2\n"]
    assert p.wait(timeout=30) == 0
    assert p.exit_code == 0 and not p.is_running()


def test_start_kill_and_wait_timeout(sandbox: mvm.Sandbox) -> None:
    p = sandbox.commands.start(["python", "-c", "import time; print('up', flush=True); time.sleep(60)"])
    assert next(iter(p.stdout)) == "up\n"
    with pytest.raises(mvm.CommandTimeout):
        p.wait(timeout=0.5)
    assert p.is_running()
    p.kill()
    assert p.wait(timeout=10) == 128 + 9


def test_send_stdin_to_a_started_process(sandbox: mvm.Sandbox) -> None:
    p = sandbox.commands.start(["python", "-c", "import sys; print(sys.stdin.read().upper(), end='')"], stdin=True)
    p.send_stdin("hello ")
    p.send_stdin(b"world")
    p.close_stdin()
    assert p.wait(timeout=30) == 0
    assert "".join(text for stream, text in p.output() if stream == "stdout") == "HELLO WORLD"


def test_list_and_connect_from_another_process(sandbox: mvm.Sandbox) -> None:
    p = sandbox.commands.start(["sleep", "30"])
    assert p.pid in [info.pid for info in sandbox.commands.list()]
    code = (
        "import mvm, sys\n"
        f"sb = mvm.Sandbox.connect({sandbox.name!r})\n"
        f"proc = sb.commands.connect({p.pid})\n"
        "proc.kill()\n"
        "print(proc.wait(timeout=10))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "137"
    assert p.wait(timeout=5) == 137


def test_logs_hold_lifecycle_and_process_output(sandbox: mvm.Sandbox) -> None:
    sandbox.commands.run(["echo", "log-marker-123"])  # its output is logged before its exit is reported
    events = list(sandbox.logs(follow=False))
    assert all(isinstance(e, mvm.LogEvent) for e in events)
    lines = [(e.source, e.stream, e.message) for e in events]
    assert any(
        src.startswith("process:") and stream == "stdout" and msg == "log-marker-123" for src, stream, msg in lines
    )
    assert any(src == "supervisor" and "created" in msg for src, _, msg in lines)
    assert len(list(sandbox.logs(tail=3))) == 3


def test_a_silent_stream_raises_stream_idle_and_leaves_the_process_running(sandbox: mvm.Sandbox) -> None:
    """``idle_timeout`` bounds a sync reader as it bounds an ``AsyncSandbox`` one."""
    process = sandbox.commands.start(["sh", "-c", "echo ready; exec sleep 300"])
    seen: list[str] = []
    with pytest.raises(mvm.StreamIdle) as idle:
        for _stream, text in process.output(idle_timeout=1.0):
            seen.append(text)
    assert seen == ["ready\n"] and isinstance(idle.value, TimeoutError)
    assert process.is_running()  # a reader's timeout leaves the process alone
    with pytest.raises(mvm.StreamIdle):
        list(process.lines("stdout", idle_timeout=0.5))
    with pytest.raises(mvm.StreamIdle):
        list(sandbox.logs(follow=True, since=1e12, idle_timeout=0.5))
    process.kill()
    assert process.wait() == 128 + 9


def test_a_command_is_audited_once_and_a_refused_start_adds_an_error_entry(sandbox: mvm.Sandbox) -> None:
    from mvm.security.audit import log_path, tail

    def runs() -> list[dict[str, Any]]:
        return [e for e in tail(log_path(sandbox.id), 100_000) if e.get("op") == "exec.run"]

    before = len(runs())
    result = sandbox.commands.run(["true"])
    entries = runs()[before:]
    assert [(e["audit_id"], e["outcome"]) for e in entries] == [(result.audit_id, "ok")]
    with pytest.raises(mvm.FileNotFoundInSandbox):
        sandbox.commands.run(["/no/such/command"])
    request, refused = runs()[before + 1:]
    assert request["outcome"] == "ok"  # the request, on record while the guest tried to start it
    assert (refused["outcome"], refused["error_type"]) == ("error", "FileNotFound")
    assert refused["details"]["request"] == request["audit_id"]
