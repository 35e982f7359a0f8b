"""The same workload written in Python and in TypeScript compiles to the same IR.

`mvmctl compile|run` runs a `.ts`/`.mjs` script with Node and the TypeScript SDK, which
appends the recording events Python's RecordTransport appends; both lower to one
workload-v1 document, so the IR hash (its id) is the same. Also: plan and record mode,
error reporting with the script's own line, the record-mode time limit, and a live run
of a TypeScript script on the namespace backend.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from ts_helpers import REPO, mvmctl_env, run_mvmctl

PY_TWIN = '''
import mvm

with mvm.Sandbox.create(
    "python-3.11",
    name="twin-workload",
    workload_id="Twin Workload!",
    ttl="2h",
    include=["src", "data/config.json"],
    resources=mvm.resources(cpu_cores=0.5, memory_mb=256, rootfs_size_mb=2048, max_processes=64),
    network=mvm.network(mode="allow", allow=["pypi.org:443", "10.0.0.0/8:80"], allow_wildcards=True),
    env={"MODE": "dev", "API_KEY": mvm.secret("api-key")},
    backend="namespace",
    tags={"team": "sdk"},
    auto_pause="5m",
    on_behalf_of={"client": "twin"},
) as sandbox:
    sandbox.files.mkdir("/work/data", parents=True, mode=0o700)
    sandbox.files.write("/work/data/input.json", b'{"n": 1}', mode=0o600)
    sandbox.files.write("/work/unicode.txt", "h\\u00e9llo \\u2713", make_parents=False)
    result = sandbox.commands.run(["python", "-c", "print(1)"], env={"TOKEN": mvm.secret("api-key"), "A": "b"},
                                  cwd="/work", timeout_seconds=12.5, max_output_bytes=2048, stdin="some input",
                                  check=True)
    assert result.exit_code is None and result.recorded
    server = sandbox.commands.start("python -m http.server 8000", stdin=True, auto_resume=True)
    server.send_stdin("ping\\n")
    server.close_stdin()
    server.signal("SIGINT", group=False)
    sandbox.files.move("/work/data/input.json", "/work/data/moved.json", overwrite=True)
    sandbox.files.remove("/work/data", recursive=True)
    snap = sandbox.snapshot("after-index", expires="24h", keep=True)
    sandbox.pause()
    sandbox.resume()
    sandbox.stop()
    sandbox.start()
    sandbox.resume(snap)
    sandbox.resume("snap-external")
    server.kill()
    sandbox.commands.run("echo done", timeout_seconds=None)
    big = bytes(range(256)) * 12289  # over one frame: a chunked write, and a staged stdin
    sandbox.files.write("/work/big.bin", big)
    sandbox.commands.run(["wc", "-c"], stdin=big)
'''

TS_TWIN = '''
import { Sandbox, network, resources, secret } from "@mvm/sdk";

await using sandbox = await Sandbox.create("python-3.11", {
  name: "twin-workload",
  workloadId: "Twin Workload!",
  ttl: "2h",
  include: ["src", "data/config.json"],
  resources: resources({ cpuCores: 0.5, memoryMb: 256, rootfsSizeMb: 2048, maxProcesses: 64 }),
  network: network({ mode: "allow", allow: ["pypi.org:443", "10.0.0.0/8:80"], allowWildcards: true }),
  env: { MODE: "dev", API_KEY: secret("api-key") },
  backend: "namespace",
  tags: { team: "sdk" },
  autoPause: "5m",
  onBehalfOf: { client: "twin" },
});
await sandbox.files.mkdir("/work/data", { parents: true, mode: 0o700 });
await sandbox.files.write("/work/data/input.json", new TextEncoder().encode('{"n": 1}'), { mode: 0o600 });
await sandbox.files.write("/work/unicode.txt", "h\\u00e9llo \\u2713", { makeParents: false });
const result = await sandbox.commands.run(["python", "-c", "print(1)"], {
  env: { TOKEN: secret("api-key"), A: "b" }, cwd: "/work", timeoutSeconds: 12.5, maxOutputBytes: 2048,
  stdin: "some input", check: true,
});
if (result.exitCode !== null || !result.recorded) throw new Error("a recorded result has no exit code");
const server = await sandbox.commands.start("python -m http.server 8000", { stdin: true, autoResume: true });
await server.sendStdin("ping\\n");
await server.closeStdin();
await server.signal("SIGINT", { group: false });
await sandbox.files.move("/work/data/input.json", "/work/data/moved.json", { overwrite: true });
await sandbox.files.remove("/work/data", { recursive: true });
const snap = await sandbox.snapshot("after-index", { expires: "24h", keep: true });
await sandbox.pause();
await sandbox.resume();
await sandbox.stop();
await sandbox.start();
await sandbox.resume(snap);
await sandbox.resume("snap-external");
await server.kill();
await sandbox.commands.run("echo done", { timeoutSeconds: null });
const big = new Uint8Array(256 * 12289).map((_, i) => i % 256); // over one frame: a chunked write, and a staged stdin
await sandbox.files.write("/work/big.bin", big);
await sandbox.commands.run(["wc", "-c"], { stdin: big });
'''

# The seed example as plain JavaScript (no `await using` outside TypeScript): try/finally + kill().
MJS_SEED = '''
import { Sandbox, network, resources, secret } from "@mvm/sdk";

const sandbox = await Sandbox.create("python-3.13", {
  workloadId: "agent-tool",
  ttl: "30m",
  include: ["src"],
  resources: resources({ cpuCores: 1, memoryMb: 512, rootfsSizeMb: 1024 }),
  network: network({ mode: "deny" }),
});
try {
  await sandbox.files.write("/app/main.py", "print('hello from mvm')");
  await sandbox.commands.start(["python", "/app/main.py"], { env: { MODE: "dev", API_KEY: secret("api-key") } });
} finally {
  await sandbox.kill();
}
'''


@pytest.fixture
def project(tmp_path: Path, ts_sdk: Path) -> Path:
    """A folder with src/ and data/ beside the scripts (for include=[...])."""
    folder = tmp_path / "project"
    (folder / "src" / "pkg").mkdir(parents=True)
    (folder / "src" / "util.py").write_text("VALUE = 42\n")
    (folder / "src" / "pkg" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (folder / "src" / "pkg" / "run.sh").chmod(0o755)
    (folder / "data").mkdir()
    (folder / "data" / "config.json").write_text('{"debug": true}\n')
    return folder


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def compile_to(script: Path, out: Path, home: Path) -> dict:
    done = run_mvmctl("compile", str(script), "--out", str(out), "--json", env=mvmctl_env(MVM_HOME=str(home)))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_seed_examples_compile_to_the_same_ir(tmp_path: Path, home: Path, ts_sdk: Path) -> None:
    py = compile_to(REPO / "examples" / "seed_example.py", tmp_path / "py", home)
    ts = compile_to(REPO / "examples" / "seed_example.ts", tmp_path / "ts", home)
    assert ts["sha256"] == py["sha256"]
    assert (tmp_path / "ts" / "workload.json").read_bytes() == (tmp_path / "py" / "workload.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "ts" / "files").iterdir()) == \
        sorted(p.name for p in (tmp_path / "py" / "files").iterdir())
    assert not (home / "sandboxes").exists() or not any((home / "sandboxes").iterdir()), "record mode booted something"


def test_equivalent_scripts_compile_to_the_same_ir(project: Path, tmp_path: Path, home: Path) -> None:
    (project / "twin.py").write_text(textwrap.dedent(PY_TWIN).lstrip())
    (project / "twin.ts").write_text(textwrap.dedent(TS_TWIN).lstrip())
    py = compile_to(project / "twin.py", tmp_path / "py", home)
    ts = compile_to(project / "twin.ts", tmp_path / "ts.tar.gz", home)
    assert py["operations"] == 22
    assert ts["sha256"] == py["sha256"]
    doc = json.loads((tmp_path / "py" / "workload.json").read_text())
    assert (doc["auto_pause_seconds"], doc["on_behalf_of"]) == (300, {"client": "twin"})
    big_write, big_run = doc["operations"][-3:-1]
    assert (big_write["op"], big_write["size"], big_run["op"]) == ("files.write", 256 * 12289, "commands.run")
    assert big_run["stdin_sha256"] == big_write["sha256"]  # the staged stdin is the run's, not a file write
    assert [f["path"] for f in doc["include"]["files"]] == ["data/config.json", "src/pkg/run.sh", "src/util.py"]
    assert doc["include"]["files"][1]["mode"] == 0o755
    assert doc["env"]["API_KEY"] == {"kind": "secret_ref", "name": "api-key"}


def test_a_javascript_module_compiles_to_the_same_ir_too(tmp_path: Path, home: Path, ts_sdk: Path) -> None:
    folder = tmp_path / "examples"
    shutil.copytree(REPO / "examples" / "src", folder / "src")
    (folder / "seed.mjs").write_text(textwrap.dedent(MJS_SEED).lstrip())
    py = compile_to(REPO / "examples" / "seed_example.py", tmp_path / "py", home)
    js = compile_to(folder / "seed.mjs", tmp_path / "js", home)
    assert js["sha256"] == py["sha256"]


def test_plan_mode_admits_a_typescript_script_only_with_its_secret(home: Path, ts_sdk: Path) -> None:
    script = str(REPO / "examples" / "seed_example.ts")
    refused = run_mvmctl("run", "--mode", "plan", script, env=mvmctl_env(MVM_HOME=str(home)))
    assert refused.returncode == 1, refused.stderr
    assert "NOT ADMITTED" in refused.stdout
    assert "(created at seed_example.ts:16)" in refused.stdout
    assert "[seed_example.ts:24]" in refused.stdout  # the commands.start line
    admitted = run_mvmctl("run", "--mode", "plan", script,
                          env=mvmctl_env(MVM_HOME=str(home), MVM_SECRET_API_KEY="a-value-never-printed"))
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    assert "a-value-never-printed" not in admitted.stdout + admitted.stderr


def test_a_failing_typescript_script_is_reported_at_its_own_line(project: Path, tmp_path: Path, home: Path) -> None:
    script = project / "bad.ts"
    script.write_text(textwrap.dedent('''
        import { Sandbox, resources } from "@mvm/sdk";

        const limits = () => resources({ memoryMb: 10 });
        await using sandbox = await Sandbox.create("python-3.13", { resources: limits() });
    ''').lstrip())
    out = tmp_path / "out"
    done = run_mvmctl("compile", str(script), "--out", str(out), env=mvmctl_env(MVM_HOME=str(home)))
    assert done.returncode != 0
    assert "raised InvalidArgument: resources.memory_mb: 10 is out of range (allowed: 64..262144)" in done.stderr
    assert f'File "{script}", line 3' in done.stderr
    assert f'File "{script}", line 4' in done.stderr
    assert not out.exists()


def test_a_typescript_script_that_never_ends_hits_the_record_time_limit(project: Path, home: Path) -> None:
    script = project / "slow.ts"
    script.write_text('import { Sandbox } from "@mvm/sdk";\nawait Sandbox.create("python-3.13");\n'
                      'await new Promise((resolve) => setTimeout(resolve, 100_000));\n')
    done = run_mvmctl("run", "--mode", "plan", "--timeout", "1", str(script), env=mvmctl_env(MVM_HOME=str(home)),
                      timeout=60)
    assert done.returncode != 0
    assert "did not finish within 1 s in plan mode" in done.stderr


def test_record_mode_shows_the_typescript_recording(home: Path, ts_sdk: Path) -> None:
    done = run_mvmctl("run", "--mode", "record", "--json", str(REPO / "examples" / "seed_example.ts"),
                      env=mvmctl_env(MVM_HOME=str(home)))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [e["op"] for e in data["events"]] == ["sandbox.create", "files.write", "commands.start", "sandbox.destroy"]
    assert data["events"][0]["at"] == "seed_example.ts:16"


def test_a_live_typescript_run_passes_the_exit_status_through_and_cleans_up(project: Path) -> None:
    script = project / "live.ts"
    script.write_text(textwrap.dedent('''
        import { Sandbox } from "@mvm/sdk";

        const sandbox = await Sandbox.create("python-3.13", { ttl: "5m", include: ["src"] });
        await sandbox.files.write("/app/main.py",
            "import sys; sys.path.insert(0, '/app/src'); import util; print('hello from mvm', util.VALUE)");
        const result = await sandbox.commands.run(["python", "/app/main.py"]);
        console.log(`stdout: ${result.stdout.trim()}; exit ${result.exitCode}`);
        process.exitCode = 3; // and the sandbox is left running: mvmctl destroys it
    ''').lstrip())
    done = run_mvmctl("run", "--mode", "live", str(script), env=mvmctl_env(MVM_BACKEND="namespace"))
    assert done.returncode == 3, done.stderr
    assert "stdout: hello from mvm 42; exit 0" in done.stdout  # 42 comes from the included src/util.py
    assert "which the script left running" in done.stderr
    listed = run_mvmctl("ls", "--json")
    assert json.loads(listed.stdout) == []
