"""Live mode and `up --from-ir`: real sandboxes on the namespace backend (python-3.13).

Skipped, with the reason, when the live stack cannot start a sandbox on this host
(the ``live_ready`` probe); never faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from modes_helpers import CANARY, EXAMPLE, run_mvmctl

import mvm

WORKLOAD = """
    import mvm

    with mvm.Sandbox.create("python-3.13", workload_id="replay-me", ttl="10m", include=["src"],
                            env={"GREETING": "hi"}) as sandbox:
        sandbox.files.write("/app/main.py", "import sys; sys.path.insert(0, '/app/src'); import util; "
                                            "print('value', util.VALUE)")
        sandbox.commands.run(["python", "/app/main.py"], timeout_seconds=60)
        sandbox.commands.run(["sh", "-c", "echo $GREETING; echo $KEY; exit 3"], env={"KEY": mvm.secret("api-key")})
"""


def _running_names() -> list[str]:
    return [info.name for info in mvm.Sandbox.list()]


def test_seed_example_runs_live(live_env: dict[str, str]) -> None:
    proc = run_mvmctl("run", "--mode", "live", str(EXAMPLE), env=live_env)
    assert proc.returncode == 0, proc.stderr
    assert "destroyed sandbox" not in proc.stderr  # the example's `with` closed it
    assert not [n for n in _running_names() if n.startswith("agent-tool")]
    assert CANARY not in proc.stdout + proc.stderr


def test_exit_status_passes_through_and_leftovers_are_torn_down(live_env: dict[str, str], write_script) -> None:
    bystander = mvm.Sandbox.create("python-3.13", name="bystander", backend="namespace", ttl="5m")
    try:
        script = write_script("""
            import sys, mvm
            sb = mvm.Sandbox.create("python-3.13", name="forgotten", ttl="10m")
            print(sb.commands.run(["python", "-c", "print(40 + 2)"]).stdout.strip())
            sys.exit(3)
        """)
        proc = run_mvmctl("run", "--mode", "live", str(script), env=live_env)
        assert proc.returncode == 3
        assert proc.stdout.strip() == "42"
        assert "destroyed sandbox forgotten" in proc.stderr
        names = _running_names()
        assert "forgotten" not in names and "bystander" in names
    finally:
        bystander.kill()


def test_a_script_that_raises_in_live_mode_still_cleans_up(live_env: dict[str, str], write_script) -> None:
    script = write_script("""
        import mvm
        sb = mvm.Sandbox.create("python-3.13", name="raiser", ttl="10m")
        raise RuntimeError("live boom")
    """)
    proc = run_mvmctl("run", "--mode", "live", str(script), env=live_env)
    assert proc.returncode == 1 and "RuntimeError: live boom" in proc.stderr
    assert "raiser" not in _running_names()


def test_plain_python_is_live(live_env: dict[str, str], write_script) -> None:
    script = write_script("""
        import mvm
        with mvm.Sandbox.create("python-3.13", include=["src"]) as sb:
            sb.files.write("/app/main.py", "print('hello from mvm')")
            result = sb.commands.run(["python", "/app/main.py"], timeout_seconds=30)
            print(result.recorded, result.exit_code, result.stdout.strip(), result.audit_id is not None)
            print(sb.files.read_text("/app/src/util.py").strip())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("MVM_MODE", "MVM_RECORDING")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**env, **live_env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False 0 hello from mvm True", "VALUE = 42"]


@pytest.mark.parametrize("archive", [False, True])
def test_up_from_ir_replays_writes_and_commands(live_env: dict[str, str], write_script, tmp_path: Path,
                                                archive: bool) -> None:
    script = write_script(WORKLOAD)
    out = tmp_path / ("w.tar.gz" if archive else "w")
    compiled = run_mvmctl("compile", str(script), "--out", str(out), "--json")
    assert compiled.returncode == 0, compiled.stderr
    digest = json.loads(compiled.stdout)["sha256"]
    script.unlink()  # runs without the script
    proc = run_mvmctl("up", "--from-ir", str(out), "--json", env=live_env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["workload_sha256"] == digest and result["destroyed"] is True
    ops = [r["op"] for r in result["results"]]
    assert ops == ["files.write", "commands.run", "commands.run", "sandbox.destroy"]
    first, second = result["results"][1], result["results"][2]
    assert (first["exit_code"], first["stdout"]) == (0, "value 42\n") and first["audit_id"]
    assert second["exit_code"] == 3 and second["stdout"].splitlines() == ["hi", "[redacted:api-key]"]
    assert CANARY not in proc.stdout + proc.stderr
    assert result["sandbox"]["name"] not in _running_names()


def test_up_from_ir_prints_each_result(live_env: dict[str, str], write_script, tmp_path: Path) -> None:
    script = write_script(WORKLOAD)
    out = tmp_path / "w"
    assert run_mvmctl("compile", str(script), "--out", str(out)).returncode == 0
    proc = run_mvmctl("up", "--from-ir", str(out), env=live_env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "value 42" in text and "-> exit 0" in text and "-> exit 3" in text and "audit aud_" in text
    assert text.index("run python /app/main.py") < text.index("run sh -c")
    assert CANARY not in text + proc.stderr


def test_up_from_ir_without_destroy_leaves_it_running(live_env: dict[str, str], write_script,
                                                      tmp_path: Path) -> None:
    script = write_script("""
        import mvm
        sb = mvm.Sandbox.create("python-3.13", name="kept-from-ir", ttl="10m", auto_pause="10m",
                                on_behalf_of={"client": "replayed"})
        sb.files.write("/work/state.txt", "kept")
    """)
    out = tmp_path / "w"
    assert run_mvmctl("compile", str(script), "--out", str(out)).returncode == 0
    proc = run_mvmctl("up", "--from-ir", str(out), env=live_env)
    try:
        assert proc.returncode == 0, proc.stderr
        assert "mvmctl down kept-from-ir" in proc.stdout
        kept = mvm.Sandbox.connect("kept-from-ir")
        assert kept.files.read("/work/state.txt") == b"kept"
        # the recorded creation options were created with again
        assert kept.describe().details["auto_pause_seconds"] == 600
        audit = Path(os.environ["MVM_HOME"]) / "audit" / f"{kept.id}.jsonl"
        created = next(e for e in map(json.loads, audit.read_text().splitlines()) if e["op"] == "sandbox.create")
        assert created["actor"]["on_behalf_of"] == {"client": "replayed"}
    finally:
        run_mvmctl("down", "kept-from-ir")


def test_a_failing_replay_destroys_the_sandbox(live_env: dict[str, str], write_script, tmp_path: Path) -> None:
    script = write_script("""
        import mvm
        sb = mvm.Sandbox.create("python-3.13", name="fails-in-replay", ttl="10m")
        sb.commands.run(["false"], check=True)
    """)
    out = tmp_path / "w"
    assert run_mvmctl("compile", str(script), "--out", str(out)).returncode == 0
    proc = run_mvmctl("up", "--from-ir", str(out), env=live_env)
    assert proc.returncode == 1 and "exited with 1" in proc.stderr
    assert "fails-in-replay" not in _running_names()
