"""Issue 6 end to end: a canary secret through every path, audit and receipts via mvmctl.

Only the guest process's environment may ever hold the canary: never $MVM_HOME,
a log, a receipt, an audit entry, an IR or an error message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mvm
from mvm.security.audit import log_path

CANARY = "canary-7f3a9c1e5b2d4f60"
MVMCTL = [sys.executable, "-m", "mvm.cli.main"]


def mvmctl(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MVMCTL, *args], capture_output=True, text=True, input=input, timeout=180,
                          env={**os.environ, **(env or {})})


def _grep_home_for(value: str) -> list[Path]:
    home = Path(os.environ["MVM_HOME"])
    hits = []
    for path in home.rglob("*"):
        if path.is_file() and not path.is_socket():
            try:
                if value.encode() in path.read_bytes():
                    hits.append(path)
            except OSError:
                pass
    return hits


def test_secret_set_reads_stdin_and_ls_shows_names_only() -> None:
    out = mvmctl("secret", "set", "e2e-key", input=CANARY + "\n")
    assert out.returncode == 0, out.stderr
    listed = mvmctl("secret", "ls", "--json")
    assert "e2e-key" in listed.stdout and CANARY not in listed.stdout
    assert _grep_home_for(CANARY) == []
    bad = mvmctl("secret", "set", "bad name!", input="x")
    assert bad.returncode == 2 and "secret name" in bad.stderr


def test_canary_secret_never_leaves_the_guest_process(tmp_path: Path) -> None:
    assert mvmctl("secret", "set", "canary", input=CANARY).returncode == 0
    with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="10m",
                            env={"CREATE_LEVEL": mvm.secret("canary")}) as sb:
        # per-command secret, printed on stdout and stderr, split across writes
        script = ("import os, sys, time\n"
                  "v = os.environ['TOKEN']\n"
                  "sys.stdout.write(v[:7]); sys.stdout.flush(); time.sleep(0.05)\n"
                  "print(v[7:]); print('create-level', os.environ['CREATE_LEVEL'], file=sys.stderr)\n")
        result = sb.commands.run(["python", "-c", script], env={"TOKEN": mvm.secret("canary")})
        assert result.exit_code == 0
        assert CANARY not in result.stdout and CANARY not in result.stderr
        assert result.stdout == "[redacted:canary]\n"
        assert "create-level [redacted:canary]" in result.stderr
        proc = sb.commands.start(["sh", "-c", "echo $TOKEN"], env={"TOKEN": mvm.secret("canary")})
        assert proc.wait(timeout=30) == 0
        assert list(proc.stdout) == ["[redacted:canary]\n"]
        assert all(CANARY not in e.message for e in sb.logs())
        # the process did get the real value
        check = sb.commands.run(["sh", "-c", f'test "$TOKEN" = "{CANARY}" && echo same'],
                                env={"TOKEN": mvm.secret("canary")})
        assert check.stdout == "same\n"
        receipt = Path(result.receipt_path or "")
        assert receipt.is_file() and CANARY not in receipt.read_text()
        sb.snapshot(name="with-canary")
        assert _grep_home_for(CANARY) == []
        sandbox_id = sb.id
    assert _grep_home_for(CANARY) == []
    assert CANARY not in log_path(sandbox_id).read_text()


def test_audit_verify_and_show_through_mvmctl() -> None:
    with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="10m") as sb:
        result = sb.commands.run(["echo", "audited"])
        shown = json.loads(mvmctl("audit", "show", str(result.audit_id), "--json").stdout)
        assert shown["op"] == "exec.run" and shown["sandbox_id"] == sb.id
        tail = mvmctl("audit", "tail", sb.name, "-n", "3")
        assert tail.returncode == 0 and "exec.run" in tail.stdout
        assert mvmctl("audit", "verify", sb.name).returncode == 0
        sandbox_id = sb.id
    # the log outlives the sandbox, and tampering is caught with the entry named
    path = log_path(sandbox_id)
    assert mvmctl("audit", "verify", sandbox_id).returncode == 0
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["op"] = "fs.read"
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    bad = mvmctl("audit", "verify", sandbox_id)
    assert bad.returncode == 1 and "entry 2" in bad.stdout


def test_exec_receipt_verifies_and_detects_an_edit(tmp_path: Path) -> None:
    assert mvmctl("up", "--name", "rcpt-box", "--backend", "namespace").returncode == 0
    try:
        receipt = tmp_path / "r.json"
        out = mvmctl("exec", "rcpt-box", "--receipt", str(receipt), "--", "echo", "receipted")
        assert out.returncode == 0 and out.stdout == "receipted\n"
        (tmp_path / "out.txt").write_text(out.stdout)
        assert mvmctl("receipt", "verify", str(receipt), "--stdout", str(tmp_path / "out.txt")).returncode == 0
        data = json.loads(receipt.read_text())
        data["exit_code"] = 1
        receipt.write_text(json.dumps(data))
        bad = mvmctl("receipt", "verify", str(receipt))
        assert bad.returncode == 1 and "FAIL" in bad.stdout
    finally:
        mvmctl("down", "rcpt-box")


@pytest.mark.parametrize("verb", [["secret", "ls"], ["audit", "verify"]])
def test_security_verbs_work_on_an_empty_home(verb: list[str]) -> None:
    assert mvmctl(*verb).returncode == 0
