"""mvmctl compile / run --mode plan|record / ir: the real CLI as a subprocess. Nothing boots:
every test checks that $MVM_HOME/sandboxes stays empty."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from modes_helpers import CANARY, EXAMPLE, assert_nothing_booted, run_mvmctl
from waiting import wait_for

from mvm.security.secrets import Keystore

SECRET = {"MVM_SECRET_API_KEY": CANARY}


@pytest.fixture(autouse=True)
def _nothing_boots(home: Path):
    yield
    assert_nothing_booted(home)


# ---- the seed's example, as the seed shows it --------------------------------------------------


def test_seed_example_compiles(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "sandbox-ir"
    proc = run_mvmctl("compile", str(EXAMPLE), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and "agent-tool" in line and "python-3.13" in line
    digest = line.rsplit("sha256 ", 1)[1]
    assert len(digest) == 64
    doc = json.loads((out / "workload.json").read_text())
    assert doc["template"] == "python-3.13" and doc["workload_id"] == "agent-tool" and doc["ttl_seconds"] == 1800
    assert doc["resources"] == {"cpu_cores": 1, "memory_mb": 512, "rootfs_size_mb": 1024, "max_processes": 256}
    assert doc["network"] == {"mode": "deny", "allow": [], "allow_wildcards": False}
    assert [f["path"] for f in doc["include"]["files"]] == ["src/greeting.py"]
    assert [op["op"] for op in doc["operations"]] == ["files.write", "commands.start", "sandbox.destroy"]
    start = doc["operations"][1]
    assert start["argv"] == ["python", "/app/main.py"]
    assert start["env"] == {"MODE": {"kind": "literal", "value": "dev"},
                            "API_KEY": {"kind": "secret_ref", "name": "api-key"}}
    written = out / "files" / doc["operations"][0]["sha256"]
    assert written.read_text() == "print('hello from mvm')"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["workloads"][0]["workload_sha256"] == digest
    valid = run_mvmctl("ir", "validate", str(out), "--json")
    assert valid.returncode == 0 and json.loads(valid.stdout)["sha256"] == digest
    shown = run_mvmctl("ir", "show", str(out))
    assert shown.returncode == 0 and "python /app/main.py" in shown.stdout and digest in shown.stdout


def test_seed_example_plan_admitted_with_the_secret(home: Path) -> None:
    proc = run_mvmctl("run", "--mode", "plan", str(EXAMPLE), env=SECRET)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ADMITTED" in out and "NOT ADMITTED" not in out
    assert "python-3.13" in out and "512 MiB memory" in out and "ttl        30m" in out
    lines = out.splitlines()
    write = next(i for i, text in enumerate(lines) if "write /app/main.py" in text)
    start = next(i for i, text in enumerate(lines) if "start process #1: python /app/main.py" in text)
    assert write < start
    assert "API_KEY=secret:api-key" in out
    assert CANARY not in out + proc.stderr


def test_seed_example_plan_refused_without_the_secret(home: Path) -> None:
    proc = run_mvmctl("run", "--mode", "plan", str(EXAMPLE), "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["admitted"] is False
    assert [(r["check"], r["field"]) for r in report["reasons"]] == [("secret", "secret['api-key']")]
    assert "mvmctl secret set api-key" in report["reasons"][0]["message"]


def test_keystore_secret_counts_and_its_value_stays_out(home: Path) -> None:
    Keystore().set("api-key", CANARY)
    proc = run_mvmctl("run", "--mode", "plan", str(EXAMPLE), "--json")
    assert proc.returncode == 0, proc.stdout
    assert CANARY not in proc.stdout + proc.stderr


def test_host_policy_file_limits_are_enforced(home: Path, write_script) -> None:
    (home / "policy.toml").write_text('max_memory_mb = 256\nmax_ttl = "10m"\nnetwork_modes = ["deny"]\nmax_cpus = 1\n')
    script = write_script("""
        import mvm
        mvm.Sandbox.create("python-3.13", ttl="1h", resources=mvm.resources(memory_mb=512, cpu_cores=2),
                           network=mvm.network(mode="allow", allow=["pypi.org:443"]))
    """)
    proc = run_mvmctl("run", "--mode", "plan", str(script), "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    fields = sorted(r["field"] for r in report["reasons"])
    assert fields == ["network.mode", "resources.cpu_cores", "resources.memory_mb", "ttl"]
    assert report["host_policy"]["source"].endswith("policy.toml")
    human = run_mvmctl("run", "--mode", "plan", str(script))
    assert human.returncode == 1
    assert "exceeds the host policy's max_memory_mb of 256 MiB" in human.stdout
    assert "the script leaves it running until its TTL" in human.stdout


def test_default_policy_refuses_more_than_the_host_has(home: Path, write_script) -> None:
    script = write_script("""
        import mvm
        with mvm.Sandbox.create("python-3.13", ttl=None, resources=mvm.resources(cpu_cores=64, memory_mb=262144)):
            pass
    """)
    report = json.loads(run_mvmctl("run", "--mode", "plan", str(script), "--json").stdout)
    fields = sorted(r["field"] for r in report["reasons"])
    assert "resources.memory_mb" in fields and "ttl" in fields
    import os
    if (os.cpu_count() or 1) < 64:
        assert "resources.cpu_cores" in fields


def test_bad_policy_file_names_the_setting(home: Path) -> None:
    (home / "policy.toml").write_text("max_gpus = 2\n")
    proc = run_mvmctl("run", "--mode", "plan", str(EXAMPLE), env=SECRET)
    assert proc.returncode == 2 and "max_gpus" in proc.stderr and "max_memory_mb" in proc.stderr


def test_run_mode_record_prints_the_recording(home: Path) -> None:
    proc = run_mvmctl("run", "--mode", "record", str(EXAMPLE), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [e["op"] for e in data["events"]] == ["sandbox.create", "files.write", "commands.start",
                                                 "sandbox.destroy"]
    assert data["events"][0]["mode"] == "record"


def test_plan_mode_reaches_the_script_as_mvm_mode(home: Path, write_script) -> None:
    script = write_script("""
        import os, mvm
        sb = mvm.Sandbox.create("python-3.13")
        assert os.environ["MVM_MODE"] == "plan", os.environ["MVM_MODE"]
        assert sb.commands.run(["true"]).exit_code is None
        sb.kill()
    """)
    proc = run_mvmctl("run", "--mode", "plan", str(script), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["workloads"][0]["operations"][0]["op"] == "commands.run"


# ---- hash stability and deterministic archives ----------------------------------------------------


def _next_second() -> None:
    """Until the wall clock's whole second has moved on (what a second-resolution mtime sees)."""
    now = int(time.time())
    wait_for(lambda: int(time.time()) > now, "the next second", timeout=5)


def test_recompiling_gives_the_same_hash_and_bytes(home: Path, tmp_path: Path, seed_copy: Path) -> None:
    first = json.loads(run_mvmctl("compile", str(seed_copy), "--out", str(tmp_path / "a"), "--json").stdout)
    _next_second()  # a later clock and a different mtime must not matter
    greeting = seed_copy.parent / "src" / "greeting.py"
    os.utime(greeting, (greeting.stat().st_atime, greeting.stat().st_mtime + 3600))
    second = json.loads(run_mvmctl("compile", str(seed_copy), "--out", str(tmp_path / "b"), "--json").stdout)
    assert first["sha256"] == second["sha256"]
    for name in ("workload.json", "plan.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a change in an included file changes the hash
    (seed_copy.parent / "src" / "greeting.py").write_text("GREETING = 'changed'\n")
    third = json.loads(run_mvmctl("compile", str(seed_copy), "--out", str(tmp_path / "c"), "--json").stdout)
    assert third["sha256"] != first["sha256"]


def test_compiling_twice_into_the_same_dir_replaces_it(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "ir"
    assert run_mvmctl("compile", str(EXAMPLE), "--out", str(out)).returncode == 0
    (out / "files" / "stale").write_text("x")
    assert run_mvmctl("compile", str(EXAMPLE), "--out", str(out)).returncode == 0
    assert not (out / "files" / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "ir"]  # no temp dirs left


def test_tar_gz_twice_is_byte_identical(home: Path, tmp_path: Path, seed_copy: Path) -> None:
    a, b = tmp_path / "one.tar.gz", tmp_path / "two.tar.gz"
    first = run_mvmctl("compile", str(seed_copy), "--out", str(a))
    _next_second()  # archive times would differ if they came from the clock
    second = run_mvmctl("compile", str(seed_copy), "--out", str(b))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert a.read_bytes() == b.read_bytes()
    valid = run_mvmctl("ir", "validate", str(a), "--json")
    assert valid.returncode == 0 and json.loads(valid.stdout)["sha256"] == first.stdout.strip().rsplit(" ", 1)[1]


def test_refuses_to_overwrite_a_foreign_directory(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    proc = run_mvmctl("compile", str(EXAMPLE), "--out", str(out))
    assert proc.returncode == 2 and "--out" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]


def test_ir_validate_names_the_bad_field(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "ir"
    run_mvmctl("compile", str(EXAMPLE), "--out", str(out))
    doc = json.loads((out / "workload.json").read_text())
    doc["operations"][1]["argv"] = []
    (out / "workload.json").write_text(json.dumps(doc))
    proc = run_mvmctl("ir", "validate", str(out))
    assert proc.returncode == 2
    assert "operations[1].argv" in proc.stderr and "Traceback" not in proc.stderr
    as_json = run_mvmctl("ir", "validate", str(out), "--json")
    assert json.loads(as_json.stderr)["error"]["field"] == "operations[1].argv"


# ---- secrets never leak ----------------------------------------------------------------------------


def test_canary_secret_never_appears_anywhere(home: Path, tmp_path: Path, write_script) -> None:
    Keystore().set("db-pass", CANARY + "-ks")
    env = {**SECRET}
    script = write_script("""
        import os, sys, mvm
        with mvm.Sandbox.create("python-3.13", env={"DB": mvm.secret("db-pass")}, include=["src"]) as sb:
            sb.commands.run(["python", "-c", "import os; print(os.environ['KEY'])"],
                            env={"KEY": mvm.secret("api-key")})
        if "--fail" in sys.argv:
            raise RuntimeError("failed; env had " + repr(sorted(k for k in os.environ if "SECRET" in k))
                               + " and ref " + str(mvm.secret("api-key")))
        if "--peek" in sys.argv:
            print(os.environ["MVM_SECRET_API_KEY"])
    """)
    outputs = []
    out_dir, archive = tmp_path / "ir", tmp_path / "ir.tar.gz"
    for args in (["compile", str(script), "--out", str(out_dir)],
                 ["compile", str(script), "--out", str(archive)],
                 ["run", "--mode", "plan", str(script)],
                 ["run", "--mode", "plan", str(script), "--json"],
                 ["run", "--mode", "record", str(script), "--json"],
                 ["ir", "show", str(out_dir), "--json"],
                 ["compile", str(script), "--out", str(tmp_path / "fail"), "--", "--fail"],
                 ["run", "--mode", "plan", str(script), "--", "--peek"]):
        proc = run_mvmctl(*args, env=env)
        outputs.append(proc.stdout + proc.stderr)
    assert "RuntimeError" in outputs[6] and "<secret api-key>" in outputs[6]
    assert "KeyError" in outputs[7]  # the script cannot even see the value in record/plan mode
    for text in outputs:
        assert CANARY not in text
    for path in out_dir.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert CANARY.encode() not in gzip.decompress(archive.read_bytes())
    assert not (tmp_path / "fail").exists()


# ---- bad scripts ------------------------------------------------------------------------------------


def test_script_that_raises(home: Path, tmp_path: Path, write_script) -> None:
    script = write_script("""
        import mvm

        def helper():
            raise ValueError("boom in the script")

        with mvm.Sandbox.create("python-3.13") as sb:
            sb.files.write("/app/x", "y")
            helper()
    """, name="raiser.py")
    out = tmp_path / "out"
    proc = run_mvmctl("compile", str(script), "--out", str(out))
    assert proc.returncode == 1
    assert "raised ValueError: boom in the script" in proc.stderr
    assert f'File "{script}", line 4, in helper' in proc.stderr
    assert f'File "{script}", line 8, in <module>' in proc.stderr
    assert "mvm/modes" not in proc.stderr  # no mvm internals
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["home", "project"]
    tgz = run_mvmctl("compile", str(script), "--out", str(tmp_path / "x.tar.gz"))
    assert tgz.returncode == 1 and not (tmp_path / "x.tar.gz").exists()
    plan = run_mvmctl("run", "--mode", "plan", str(script))
    assert plan.returncode == 1 and "line 8" in plan.stderr


def test_script_exit_status_in_record_mode(home: Path, tmp_path: Path, write_script) -> None:
    script = write_script("""
        import sys, mvm
        mvm.Sandbox.create("python-3.13")
        sys.exit(4)
    """)
    proc = run_mvmctl("compile", str(script), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "exited with status 4" in proc.stderr and "line 3" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_script_that_loops_forever_hits_the_time_limit(home: Path, tmp_path: Path, write_script) -> None:
    script = write_script("""
        import mvm, subprocess, sys
        sb = mvm.Sandbox.create("python-3.13")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)  # mvm-test-orphan"])
        n = 0
        while True:
            n += 1
    """, name="forever.py")
    out = tmp_path / "out"
    proc = run_mvmctl("compile", str(script), "--out", str(out), "--timeout", "2")
    assert proc.returncode == 1
    assert "did not finish within 2 s in record mode" in proc.stderr
    assert f'File "{script}", line 6' in proc.stderr or f'File "{script}", line 5' in proc.stderr
    assert not out.exists()

    def orphans() -> str:
        return subprocess.run(["pgrep", "-f", "mvm-test-orphan"], capture_output=True, text=True).stdout.strip()

    wait_for(lambda: not orphans(), f"the script's child to be gone (still: {orphans()})", timeout=30)


def test_sdk_misuse_gives_the_sdk_error_and_the_line(home: Path, tmp_path: Path, write_script) -> None:
    script = write_script("""
        import mvm
        with mvm.Sandbox.create("python-3.13",
                                resources=mvm.resources(cpu_cores=-1)) as sb:
            pass
    """)
    proc = run_mvmctl("compile", str(script), "--out", str(tmp_path / "out"), "--json")
    assert proc.returncode == 1
    error = json.loads(proc.stderr)["error"]
    assert error["type"] == "ScriptFailed" and error["field"] == "resources.cpu_cores"
    assert error["line"] in (2, 3) and error["file"] == str(script)
    assert "resources.cpu_cores: -1 is out of range (allowed: 0.1..64)" in error["message"]
    human = run_mvmctl("run", "--mode", "plan", str(script))
    assert "resources.cpu_cores" in human.stderr and f'File "{script}"' in human.stderr


@pytest.mark.parametrize("body, expected", [
    ('mvm.Sandbox.create("python-3.12")', "template 'python-3.12' cannot be built here"),
    ('sb = mvm.Sandbox.create("python-3.13"); sb.files.read("/app/out.json")', "files.read is not available in"),
    ('sb = mvm.Sandbox.create("python-3.13"); sb.commands.run([])', "argv: must be a non-empty list"),
    ('mvm.Sandbox.create("python-3.13", include=["../.."])', "include: '../..' lies outside"),
    ('mvm.Sandbox.create("python-3.13", network=mvm.network(mode="allow", allow=["*:443"]))',
     "wildcards are refused"),
])
def test_sdk_misuse_cases(home: Path, tmp_path: Path, write_script, body: str, expected: str) -> None:
    script = write_script("import mvm\n" + body + "\n")
    proc = run_mvmctl("compile", str(script), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert f'File "{script}", line 2' in proc.stderr
    assert not (tmp_path / "out").exists()


def test_no_sandbox_or_two_sandboxes_cannot_compile(home: Path, tmp_path: Path, write_script) -> None:
    none = write_script("print('hi')\n", name="none.py")
    proc = run_mvmctl("compile", str(none), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "created no sandbox" in proc.stderr
    two = write_script("import mvm\nmvm.Sandbox.create()\nmvm.Sandbox.create()\n", name="two.py")
    proc = run_mvmctl("compile", str(two), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "created 2 sandboxes (two.py:2, two.py:3)" in proc.stderr
    plan = run_mvmctl("run", "--mode", "plan", str(two), "--json")
    assert plan.returncode == 0 and len(json.loads(plan.stdout)["workloads"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_script_arguments_and_output(home: Path, tmp_path: Path, write_script) -> None:
    script = write_script("""
        import sys, mvm
        print("script says hi")
        mvm.Sandbox.create("python-3.13", workload_id=sys.argv[1])
    """)
    proc = run_mvmctl("compile", str(script), "--out", str(tmp_path / "o"), "--json", "--", "from-argv")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["workload_id"] == "from-argv"  # stdout stays machine-readable
    assert "script says hi" in proc.stderr


def test_plain_python_in_record_mode_via_env(home: Path, write_script) -> None:
    script = write_script("""
        import mvm
        sb = mvm.Sandbox.create("python-3.13")
        print(type(sb).__name__, sb.commands.run(["true"]).recorded)
    """)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "MVM_MODE": "record"})
    assert proc.stdout.strip() == "Sandbox True", proc.stderr


def test_help_lists_the_verbs(home: Path) -> None:
    proc = run_mvmctl("--help")
    for verb in ("compile", "run", "ir"):
        assert verb in proc.stdout
    up = run_mvmctl("up", "--help")
    assert "--from-ir" in up.stdout
    assert shutil.which("pgrep")


def test_up_from_ir_refuses_a_workload_this_host_does_not_admit(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "ir"
    assert run_mvmctl("compile", str(EXAMPLE), "--out", str(out)).returncode == 0
    proc = run_mvmctl("up", "--from-ir", str(out))  # the secret api-key is not set here
    assert proc.returncode == 1
    assert "not admitted on this host" in proc.stderr and "api-key" in proc.stderr
    (home / "policy.toml").write_text("max_memory_mb = 128\n")
    proc = run_mvmctl("up", "--from-ir", str(out), env=SECRET)
    assert proc.returncode == 1 and "resources.memory_mb" in proc.stderr
