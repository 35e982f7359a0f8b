"""``mvmctl pool up | ls | down`` and ``mvmctl up`` claiming a member: the real binary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from mvm.osutil import pid_alive
from mvm.paths import sandboxes_dir
from mvm.pooling import store
from mvm.sdk.pool import pools
from waiting import wait_for

MVMCTL = [sys.executable, "-m", "mvm.cli.main"]


def mvmctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*MVMCTL, *args], capture_output=True, text=True, timeout=180, env={**os.environ})
    if check and proc.returncode != 0:
        raise AssertionError(f"mvmctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_a_pool_made_by_the_cli_serves_mvmctl_up_and_closes_without_leftovers() -> None:
    made = json.loads(mvmctl("pool", "up", "--size", "2", "--ttl", "5m", "--memory", "384", "--json").stdout)
    try:
        assert len(made["ready"]) == 2 and made["refilling"] is False  # the command has returned
        assert made["resources"]["memory_mb"] == 384
        listed = json.loads(mvmctl("pool", "ls", "--json").stdout)
        assert [p["id"] for p in listed] == [made["id"]]
        up = json.loads(mvmctl("up", "--backend", "namespace", "--memory", "384", "--name", "from-cli-pool",
                               "--json").stdout)
        assert up["details"]["pool"]["id"] == made["id"] and up["id"] in made["ready"]
        other = json.loads(mvmctl("up", "--backend", "namespace", "--name", "not-pooled", "--json").stdout)
        assert other["details"]["pool"] is None  # 512 MiB default: not what the pool serves
        mvmctl("down", "from-cli-pool")
        mvmctl("down", "not-pooled")
        left = [m for m in made["ready"] if m != up["id"]]
        assert json.loads(mvmctl("pool", "ls", "--json").stdout)[0]["ready"] == left
    finally:
        down = json.loads(mvmctl("pool", "down", made["id"], "--json").stdout)
    assert down["destroyed"] == 1
    assert not store.pool_dir(made["id"]).exists()
    assert not any((sandboxes_dir() / member).exists() for member in made["ready"])
    assert json.loads(mvmctl("pool", "ls", "--json").stdout) == []


def test_bad_pool_values_exit_2_with_the_field() -> None:
    proc = mvmctl("pool", "up", "--size", "40", "--json", check=False)
    assert proc.returncode == 2
    error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
    assert error["type"] == "InvalidArgument" and error["field"] == "size"
    missing = mvmctl("pool", "down", "pl-0000000000", check=False)
    assert missing.returncode == 2 and "no open pool" in missing.stderr


def test_keep_filled_refills_after_a_claim_and_closes_on_sigterm() -> None:
    proc = subprocess.Popen([*MVMCTL, "pool", "up", "--size", "1", "--ttl", "5m", "--memory", "352", "--keep-filled",
                             "--json"], stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert proc.stdout is not None
        text = ""
        while True:  # one JSON document, printed once the pool is full
            line = proc.stdout.readline()
            assert line, "mvmctl pool up --keep-filled exited early"
            text += line
            if line.startswith("}"):
                break
        made = json.loads(text)
        assert made["refilling"] is True and len(made["ready"]) == 1
        up = json.loads(mvmctl("up", "--backend", "namespace", "--memory", "352", "--json").stdout)
        assert up["details"]["pool"]["id"] == made["id"]
        wait_for(lambda: [m for p in pools() if p.id == made["id"] for m in p.ready if m != up["id"]],
                 "the foreground owner refilled the pool")
        refilled = next(p for p in pools() if p.id == made["id"]).ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not store.pool_dir(made["id"]).exists()
        assert not any((sandboxes_dir() / member).exists() for member in refilled)
        mvmctl("down", up["id"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pool_hold_makes_a_pool_from_json_answers_requests_and_closes_it_at_the_end_of_stdin() -> None:
    """What the TypeScript SDK's pool() runs: mvm.pool's own checks, then one answer per line."""
    refused = subprocess.run([*MVMCTL, "pool", "hold", "--json"], input='{"sizes": 2}\n', capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2
    error = json.loads(refused.stderr.strip().splitlines()[-1])["error"]
    assert (error["type"], error["field"]) == ("InvalidArgument", "sizes") and "size" in error["allowed"]
    assert json.loads(mvmctl("pool", "ls", "--json").stdout) == []

    proc = subprocess.Popen([*MVMCTL, "pool", "hold", "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps({"size": 1, "ttl": "5m", "resources": {"memory_mb": 320}}) + "\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())["result"]
        made = first["pool"]
        assert made["owner_pid"] == proc.pid and made["resources"]["memory_mb"] == 320 and not first["recorded"]
        assert first["refused_options"]["from_snapshot"]["field"] == "from_snapshot"
        proc.stdin.write('{"op": "wait_ready"}\n{"op": "bogus"}\n')
        proc.stdin.flush()
        ready = json.loads(proc.stdout.readline())["result"]["ready"]
        assert len(ready) == 1
        assert json.loads(proc.stdout.readline())["error"]["field"] == "op"
        pids = [json.loads((sandboxes_dir() / m / "state.json").read_text())["supervisor_pid"] for m in ready]
        proc.stdin.close()  # the program at the other end exited: the pool closes as at a Python exit
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not store.pool_dir(made["id"]).exists()
    assert not any((sandboxes_dir() / member).exists() for member in ready)
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), "the members' supervisors to exit", timeout=30)
