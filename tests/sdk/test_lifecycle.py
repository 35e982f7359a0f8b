"""Create, connect, list, stop/start, destroy, TTL and crash cleanup on every backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mvm
from mvm import errors
from mvm.backends import get_backend
from mvm.paths import sandboxes_dir

TEMPLATE = "python-3.13"


def _wait_until(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_seed_example_shape_works_live(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.py").write_text("X = 1\n")
    monkeypatch.setenv("MVM_INCLUDE_BASE", str(tmp_path))
    monkeypatch.setenv("MVM_SECRET_API_KEY", "s3cr3t-canary-value")
    with mvm.Sandbox.create(
        TEMPLATE,
        workload_id="agent-tool",
        ttl="30m",
        include=["src"],
        backend=backend,
        resources=mvm.resources(cpu_cores=1, memory_mb=512, rootfs_size_mb=1024),
        network=mvm.network(mode="deny"),
    ) as sandbox:
        assert sandbox.files.read("/app/src/x.py") == b"X = 1\n"
        sandbox.files.write("/app/main.py", "print('hello from mvm')")
        p = sandbox.commands.start(
            ["python", "-c", "import os; print(os.environ['API_KEY'] == 's3cr3t-canary-value')"],
            env={"MODE": "dev", "API_KEY": mvm.secret("api-key")},
        )
        assert p.wait(timeout=30) == 0
        assert list(p.stdout) == ["True\n"]
        r = sandbox.commands.run(["python", "/app/main.py"], timeout_seconds=30)
        assert (r.exit_code, r.stdout) == (0, "hello from mvm\n")
        info = sandbox.describe()
        assert info.isolation == ("vm" if backend == "vm" else "namespace")
        assert info.workload_id == "agent-tool"
        home = Path(os.environ["MVM_HOME"])
        for path in home.rglob("*"):
            if path.is_file() and not path.is_socket():
                assert b"s3cr3t-canary-value" not in path.read_bytes(), path
        sandbox_dir = sandboxes_dir() / sandbox.id
        assert sandbox_dir.exists()
    assert not sandbox_dir.exists()


def test_missing_secret_fails_at_the_call(backend: str) -> None:
    os.environ.pop("MVM_SECRET_NOT_SET_ANYWHERE", None)
    with pytest.raises(mvm.SecretNotFound, match="not-set-anywhere"):
        mvm.Sandbox.create(TEMPLATE, backend=backend, env={"K": mvm.secret("not-set-anywhere")})
    assert list(sandboxes_dir().iterdir()) == [] or all((d / "state.json").exists() for d in sandboxes_dir().iterdir())


def test_unknown_template_lists_the_buildable_ones_and_leaves_nothing(backend: str) -> None:
    before = set(sandboxes_dir().iterdir())
    with pytest.raises(mvm.TemplateNotFound) as info:
        mvm.Sandbox.create("python-3.12", backend=backend)
    assert "python-3.13" in info.value.available and "python-3.12" not in info.value.available
    assert "python-3.13" in str(info.value)
    assert set(sandboxes_dir().iterdir()) == before


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"resources": "big"}, "resources"),
        ({"ttl": "forever"}, "ttl"),
        ({"name": "Bad Name!"}, "name"),
        ({"include": ["../../etc"]}, "include"),
        ({"env": {"A": 1}}, "env"),
    ],
)
def test_bad_input_names_the_field_and_leaves_nothing(backend: str, kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    before = set(sandboxes_dir().iterdir())
    with pytest.raises(mvm.InvalidArgument) as info:
        mvm.Sandbox.create(TEMPLATE, backend=backend, **kwargs)
    assert field in str(info.value)
    assert set(sandboxes_dir().iterdir()) == before


def test_policy_builders_validate_at_the_call() -> None:
    with pytest.raises(mvm.InvalidArgument, match="memory_mb"):
        mvm.resources(memory_mb=1)
    with pytest.raises(mvm.InvalidNetworkPolicy, match="mode"):
        mvm.network(mode="sometimes")
    with pytest.raises(mvm.InvalidArgument, match="backend"):
        mvm.Sandbox.create(TEMPLATE, backend="docker")
    for sneaky in ("pypi.org\n:443", "pypi.org:\u0664\u0664\u0663", "pypi.org:\u00b2", "*.example.com:443"):
        with pytest.raises(mvm.InvalidNetworkPolicy, match=r"network\.allow"):
            mvm.network(mode="allow", allow=[sneaky])


def test_bad_arguments_are_refused_before_the_supervisor_is_reached() -> None:
    """Argument errors come first, whatever state the sandbox is in: a handle to a
    sandbox that does not exist still names the bad field, not SandboxNotFound."""
    gone = mvm.Sandbox("sb-nothing0001", "nothing", Path("/nonexistent"))
    calls = [
        (lambda: gone.ports.close(1.5), "forward"),
        (lambda: gone.network.update("x.org:1"), "network.allow"),
        (lambda: gone.snapshot(expires="soon"), "expires"),
    ]
    for call, field in calls:
        with pytest.raises(mvm.InvalidArgument) as info:
            call()
        assert field in str(info.value)


def test_stop_keeps_files_start_runs_again_and_states_are_enforced(backend: str) -> None:
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m") as sandbox:
        sandbox.files.write("/data/kept.txt", "still here")
        assert sandbox.commands.run(["echo", "first boot"]).stdout == "first boot\n"
        assert sandbox.describe().state == "running"
        assert sandbox.stop().state == "stopped"
        with pytest.raises(errors.InvalidState, match="stopped"):
            sandbox.commands.run(["true"])
        assert sandbox.start().state == "running"
        assert sandbox.files.read("/data/kept.txt") == b"still here"
        # pid numbers repeat in a new boot: nothing of the previous boot's output leaks in
        assert sandbox.commands.run(["echo", "second boot"]).stdout == "second boot\n"
    with pytest.raises(errors.InvalidState, match="destroyed"):
        sandbox.commands.run(["true"])
    sandbox.kill()  # twice is fine


def test_connect_and_list_from_another_process(backend: str) -> None:
    with mvm.Sandbox.create(TEMPLATE, backend=backend, name=f"shared-{backend}", ttl="10m") as sandbox:
        listed = {i.id: i for i in mvm.Sandbox.list()}
        assert sandbox.id in listed
        # the isolation the launch path recorded (the backend registry's answer), read back by the listing
        config = json.loads((sandboxes_dir() / sandbox.id / "config.json").read_text())
        assert config["isolation"] == get_backend(backend).isolation == listed[sandbox.id].isolation
        code = textwrap.dedent(f"""
            import mvm
            sb = mvm.Sandbox.connect("shared-{backend}")
            print(sb.commands.run(["echo", "from-elsewhere"]).stdout, end="")
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.stdout == "from-elsewhere\n", out.stderr
        with pytest.raises(mvm.NameTaken, match="already exists"):
            mvm.Sandbox.create(TEMPLATE, backend=backend, name=f"shared-{backend}")
    with pytest.raises(mvm.SandboxNotFound):
        mvm.Sandbox.connect(f"shared-{backend}")


def test_ttl_destroys_the_sandbox_after_its_creator_was_killed(backend: str) -> None:
    code = textwrap.dedent(f"""
        import mvm, os, sys
        sb = mvm.Sandbox.create("{TEMPLATE}", backend="{backend}", ttl=4)
        print(sb.id, flush=True)
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    sandbox_id = proc.stdout.strip()
    assert (sandboxes_dir() / sandbox_id).exists()
    assert _wait_until(lambda: not (sandboxes_dir() / sandbox_id).exists(), timeout=60)
    assert sandbox_id not in [i.id for i in mvm.Sandbox.list()]


def test_include_keeps_layout_and_never_follows_a_symlink_out(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host-secret.txt").write_text("host only")
    project = tmp_path / "project"
    (project / "src" / "pkg").mkdir(parents=True)
    (project / "src" / "pkg" / "mod.py").write_text("VALUE = 2\n")
    (project / "src" / "inside-link.py").symlink_to(project / "src" / "pkg" / "mod.py")
    (project / "src" / "escape.txt").symlink_to(outside / "host-secret.txt")
    (project / "src" / "escape-dir").symlink_to(outside)
    monkeypatch.setenv("MVM_INCLUDE_BASE", str(project))
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="5m", include=["src"]) as sb:
        assert sb.files.read("/app/src/pkg/mod.py") == b"VALUE = 2\n"
        assert sb.files.read("/app/src/inside-link.py") == b"VALUE = 2\n"
        assert not sb.files.exists("/app/src/escape.txt")
        assert not sb.files.exists("/app/src/escape-dir")
        listing = sb.commands.run(["sh", "-c", "grep -r 'host only' /app || echo clean"]).stdout
        assert listing == "clean\n"


@pytest.mark.parametrize("zygote", ["1", "0"])
def test_supervisor_outlives_its_creator_with_or_without_the_zygote(backend: str, zygote: str) -> None:
    """Supervisors come from the creating process's zygote (fast) or a fresh interpreter
    (MVM_ZYGOTE=0); either way the sandbox is independent of the process that made it."""
    code = textwrap.dedent(f"""
        import mvm
        sb = mvm.Sandbox.create("{TEMPLATE}", backend="{backend}", ttl="5m")
        print(sb.id, flush=True)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "MVM_ZYGOTE": zygote},
    )
    assert proc.returncode == 0, proc.stderr
    sandbox = mvm.Sandbox.connect(proc.stdout.strip())
    try:
        assert sandbox.commands.run(["echo", "alive"]).stdout == "alive\n"
    finally:
        sandbox.kill()
