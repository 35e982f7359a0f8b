"""Real template builds with mmdebstrap (shared cache: see conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from waiting import wait_for

from mvm.agent import install as agent_install
from mvm.errors import InvalidState, TemplateBuildError
from mvm.templates import (
    TemplateImage,
    build_raw_disk,
    builder,
    ensure_template,
    list_templates,
    remove_template,
    recipe,
    store,
)
from mvm.paths import sandboxes_dir, templates_dir
from mvm.templates.recipe import template_digest
from mvm.templates.builder import load_image
from mvm.templates.disk import raw_disk_size

CAN_BUILD = os.geteuid() == 0 and shutil.which("mmdebstrap", path="/usr/bin:/usr/local/bin") is not None
pytestmark = [pytest.mark.skipif(not CAN_BUILD, reason="template builds need root and mmdebstrap"), pytest.mark.slow]
Built = Callable[[str], TemplateImage]
Scratch = Callable[[TemplateImage], Path]


def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([store.host_tool("chroot"), str(root), *argv], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"})


# ---- what a template contains -------------------------------------------------------


def test_python_3_13_runs_python_and_pip_commands(built: Built) -> None:
    image = built("python-3.13")
    assert image.suite == "trixie" and image.python_version.startswith("3.13.")
    version = chroot(image.rootfs, "python", "--version")
    assert version.returncode == 0 and version.stdout.startswith("Python 3.13."), version
    pip = chroot(image.rootfs, "pip", "--version")
    assert pip.returncode == 0 and "(python 3.13)" in pip.stdout, pip
    assert (image.rootfs / "opt/mvm/bin/mvm-agent").is_file()
    assert image.agent_command[0] == "/usr/bin/python3"


def test_python_3_11_runs_python_and_pip_commands(built: Built) -> None:
    image = built("python-3.11")
    assert image.suite == "bookworm" and image.python_version.startswith("3.11.")
    assert chroot(image.rootfs, "python", "--version").stdout.startswith("Python 3.11.")
    assert "(python 3.11)" in chroot(image.rootfs, "pip", "--version").stdout


@pytest.mark.parametrize(("name", "major"), [("node-18", "v18."), ("node-20", "v20.")])
def test_node_templates_run_node_and_npm(built: Built, name: str, major: str) -> None:
    image = built(name)
    node = chroot(image.rootfs, "node", "-e", "console.log(process.version)")
    assert node.returncode == 0 and node.stdout.startswith(major), node
    assert image.node_version is not None and major.startswith("v" + image.node_version.split(".")[0])
    assert chroot(image.rootfs, "npm", "--version").returncode == 0


@pytest.mark.parametrize("name", ["minimal", "python-3.11", "python-3.13", "node-18", "node-20"])
def test_every_template_is_ready_for_a_sandbox(built: Built, name: str) -> None:
    image = built(name)
    root = image.rootfs
    assert (root / "etc/hostname").read_text() == "sandbox\n"
    hosts = (root / "etc/hosts").read_text()
    assert "127.0.0.1\tlocalhost" in hosts and "::1" in hosts
    resolv = root / "etc/resolv.conf"
    assert not resolv.is_symlink() and resolv.read_bytes() == b""  # no network unless the policy opens one
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert list((root / "dev").iterdir()) == []  # the backends mount their own /dev
    assert (root / "app").is_dir() and not any((root / "app").iterdir())
    assert os.path.lexists(root / "usr/bin/python3")
    assert (root / "opt/mvm/bin/mvm-agent").is_file()
    assert not list(root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"))
    assert [p.name for p in (root / "var/lib/apt/lists").iterdir() if p.is_file() and p.name != "lock"] == []
    assert not list((root / "var/cache/apt").glob("*.bin"))
    assert chroot(root, "/usr/bin/python3", "-c", "print('ok')").stdout == "ok\n"

    manifest = json.loads(image.manifest_path.read_text())
    assert manifest["name"] == name and manifest["digest"] == image.digest
    assert image.directory.name == f"{name}-{image.digest[:16]}"
    assert manifest["suite"] == image.suite and manifest["python_version"] == image.python_version
    assert template_digest(recipe(name), manifest["agent_digest"]) == image.digest  # the agent it was built with
    assert manifest["size"] > 10 * 2**20 and manifest["built_at"]
    assert all(manifest["package_versions"][p] for p in manifest["packages"])


def test_pip_install_works_for_a_user_in_python_templates(built: Built, scratch_root: Scratch,
                                                           tmp_path: Path) -> None:
    image = built("python-3.13")
    root = scratch_root(image)  # writable overlay: the template itself stays untouched
    wheel = root / "tmp/hello_mvm-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("hello_mvm.py", "GREETING = 'hi from a wheel'\n")
        archive.writestr("hello_mvm-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: hello-mvm\nVersion: 1.0\n")
        archive.writestr("hello_mvm-1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("hello_mvm-1.0.dist-info/RECORD", "")
    result = chroot(root, "pip", "install", "--no-index", "/tmp/" + wheel.name)
    assert result.returncode == 0, result.stderr
    assert "externally-managed" not in result.stderr
    assert chroot(root, "python", "-c", "import hello_mvm; print(hello_mvm.GREETING)").stdout == "hi from a wheel\n"
    assert not list(image.rootfs.glob("usr/local/lib/python3*/dist-packages/hello_mvm.py"))


def test_custom_template_installs_pip_packages_and_files(built: Built, tmp_path: Path) -> None:
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    (tmp_path / "settings.ini").write_text("[app]\ndebug = true\n")
    toml = tmp_path / "tools.toml"
    toml.write_text("""
name = "mvm-test-pip-files"
suite = "bookworm"
packages = ["python3"]
pip_packages = ["six==1.17.0"]
[files]
"/usr/local/bin/tool" = { source = "tool.sh", mode = "0755" }
"/etc/mvm-test/settings.ini" = "settings.ini"
""")
    image = ensure_template(toml, progress=lambda _: None)
    root = image.rootfs
    assert chroot(root, "python3", "-c", "import six; print(six.__version__)").stdout == "1.17.0\n"
    assert chroot(root, "tool").stdout == "tool ran\n"
    settings = root / "etc/mvm-test/settings.ini"
    assert settings.read_text() == "[app]\ndebug = true\n"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o644 and settings.stat().st_uid == 0
    assert stat.S_IMODE((root / "usr/local/bin/tool").stat().st_mode) == 0o755
    # once built, the custom template is known by its name
    assert ensure_template("mvm-test-pip-files").directory == image.directory
    assert "mvm-test-pip-files" in builder.catalog.available_templates()


# ---- the cache ----------------------------------------------------------------------


def test_cache_hit_returns_the_same_build_without_touching_it(built: Built,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    image = built("minimal")
    before = (image.directory.stat().st_mtime_ns, image.manifest_path.stat().st_mtime_ns)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not build or walk the rootfs")

    monkeypatch.setattr(builder, "_build", forbidden)
    monkeypatch.setattr(store, "tree_usage", forbidden)
    phases: list[str] = []
    again = ensure_template("minimal", progress=phases.append)
    assert again == image and phases == []
    assert (image.directory.stat().st_mtime_ns, image.manifest_path.stat().st_mtime_ns) == before


def test_agent_change_reuses_the_previous_build_by_copy(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    old = built("minimal")
    monkeypatch.setattr(agent_install, "source_digest", lambda: "e" * 64)
    phases: list[str] = []
    new = ensure_template("minimal", progress=phases.append)
    try:
        assert new.directory != old.directory and new.digest != old.digest
        assert not any("downloading packages" in p for p in phases), phases  # no mmdebstrap run
        manifest = json.loads(new.manifest_path.read_text())
        assert manifest["reused_from"] == old.digest and manifest["agent_digest"] == "e" * 64
        assert (new.rootfs / "opt/mvm/bin/mvm-agent").is_file()
        # a real copy: the sandboxes of one must never share inodes with the other
        python = os.path.realpath(old.rootfs / "usr/bin/python3").replace(str(old.rootfs), "")
        assert os.stat(str(old.rootfs) + python).st_ino != os.stat(str(new.rootfs) + python).st_ino
    finally:
        store.discard(new.directory)


def test_concurrent_ensure_builds_once(isolated_templates: Path, tmp_path: Path) -> None:
    toml = tmp_path / "conc.toml"
    toml.write_text('name = "mvm-test-concurrent"\nsuite = "bookworm"\npackages = ["python3-minimal"]\n')
    code = (
        "import json, sys\n"
        "from mvm.agent import install\n"
        "install.source_digest = lambda: 'c' * 64  # hold the digest still while others edit the agent\n"
        "from mvm.templates import ensure_template\n"
        "phases = []\n"
        "image = ensure_template(sys.argv[1], progress=phases.append)\n"
        "print(json.dumps({'dir': str(image.directory), 'phases': phases}))\n"
    )
    env = {**os.environ, "MVM_TEMPLATES": str(isolated_templates)}
    workers = [subprocess.Popen([sys.executable, "-c", code, str(toml)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=280)
        assert worker.returncode == 0, err
        results.append(json.loads(out))
    assert len({r["dir"] for r in results}) == 1
    builders = [r for r in results if any("downloading packages" in p for p in r["phases"])]
    assert len(builders) == 1, [r["phases"] for r in results]
    builds = [p.name for p in isolated_templates.iterdir() if not p.name.startswith(".")]
    assert builds == [Path(results[0]["dir"]).name]
    assert not [p for p in isolated_templates.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_failed_build_raises_and_leaves_nothing_behind(isolated_templates: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text('name = "mvm-test-bad"\nsuite = "bookworm"\npackages = ["no-such-package-mvm-test"]\n')
    with pytest.raises(TemplateBuildError) as caught:
        ensure_template(toml)
    assert "Unable to locate package no-such-package-mvm-test" in str(caught.value)
    assert caught.value.details["log_tail"]
    leftovers = [p.name for p in isolated_templates.iterdir() if p.name != ".locks"]
    assert leftovers == []
    assert store.mounts_under(isolated_templates) == []
    # without a callback and without a terminal: one plain line per phase on stderr
    err = capfd.readouterr().err
    assert "mvm: building template mvm-test-bad (bookworm, 2 packages): checking the requested packages" in err
    assert "failed after" in err


def test_interrupted_build_stops_mmdebstrap_and_leaves_nothing_behind(isolated_templates: Path) -> None:
    def interrupt(phase: str) -> None:
        if "installing essential packages" in phase:  # mmdebstrap has its mounts up by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_template("minimal", progress=interrupt)
    assert [p.name for p in isolated_templates.iterdir() if p.name != ".locks"] == []
    assert store.mounts_under(isolated_templates) == []
    assert _processes_using(isolated_templates) == []


def _mmdebstrap_temporaries() -> set[Path]:
    """What mmdebstrap leaves in the system's temporary directory when it is killed."""
    return set(Path(tempfile.gettempdir()).glob("mmdebstrap.*")) | set(Path("/tmp").glob("mmdebstrap.*"))


def test_killed_build_takes_mmdebstrap_with_it_and_leaves_only_removable_debris(isolated_templates: Path) -> None:
    code = "from mvm.templates import ensure_template; ensure_template('minimal')"
    env = {**os.environ, "MVM_TEMPLATES": str(isolated_templates)}
    before = _mmdebstrap_temporaries()
    build = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
    assert build.stderr is not None
    for line in build.stderr:
        if "installing essential packages" in line:
            break
    # mmdebstrap's own temporaries (its gpg home) are in the build's directory
    scratch = [p for p in isolated_templates.glob(f".tmp-*/{builder.BUILD_TMPDIR}/mmdebstrap.gpghome.*")]
    assert len(scratch) == 1, list(isolated_templates.glob(".tmp-*/*"))
    build.kill()  # SIGKILL: no finally blocks run
    build.wait()
    wait_for(lambda: _processes_using(isolated_templates) == [], "the build's processes to end", timeout=60,
             interval=0.2)
    assert _mmdebstrap_temporaries() - before == set()
    debris = [p for p in isolated_templates.iterdir() if p.name.startswith(".tmp-")]
    assert len(debris) == 1
    key = debris[0].name[len(".tmp-"):].split("+")[0]
    assert store.clean_stale(own_key=key) == debris  # what the next build of that key does first
    assert [p.name for p in isolated_templates.iterdir() if p.name != ".locks"] == []
    assert store.mounts_under(isolated_templates) == []


def _processes_using(path: Path) -> list[Path]:
    return [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(path).encode() in _read(p)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_debris_of_crashed_builds_is_cleaned(isolated_templates: Path) -> None:
    isolated_templates.mkdir(parents=True)
    old = isolated_templates / ".tmp-minimal-0123456789abcdef+crash1"
    fresh = isolated_templates / ".tmp-minimal-fedcba9876543210+running"
    busy = isolated_templates / ".tmp-node-20-00112233445566ff+locked"
    trash = isolated_templates / ".trash-minimal-aaaaaaaaaaaaaaaa+x"
    for d in (old, fresh, busy, trash):
        (d / "rootfs/etc").mkdir(parents=True)
    hour_ago = time.time() - 2 * 3600
    for d in (old, busy):
        os.utime(d, (hour_ago, hour_ago))
    with store.build_lock("node-20-00112233445566ff"):  # a build that is still running
        removed = store.clean_stale()
    assert sorted(removed) == sorted([old, trash])
    assert fresh.exists() and busy.exists()


def test_list_and_remove_templates(built: Built, isolated_templates: Path) -> None:
    isolated_templates.mkdir(parents=True)
    source = built("minimal").directory
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(isolated_templates / source.name)], check=True)
    listed = list_templates()
    assert [t["name"] for t in listed] == ["minimal"]
    entry = listed[0]
    assert entry["digest"] == built("minimal").digest and entry["path"] == str(isolated_templates / source.name)
    assert entry["size"] > 0 and entry["built_at"] and entry["current"] is True
    with open(isolated_templates / source.name / "rootfs/usr/bin/python3", "rb"):  # like QEMU holding its disk
        with pytest.raises(InvalidState, match="in use"):
            remove_template("minimal")
    assert remove_template("minimal") == 1
    assert list_templates() == [] and remove_template("minimal") == 0
    assert [p.name for p in isolated_templates.iterdir() if p.name != ".locks"] == []


# ---- the VM backend's disk image ----------------------------------------------------------


def test_raw_disk_is_a_read_only_ext4_image_of_the_rootfs(built: Built) -> None:
    image = built("minimal")
    disk = build_raw_disk(image)
    assert disk == image.raw_disk and disk.is_file()
    assert stat.S_IMODE(disk.stat().st_mode) == 0o444
    manifest = json.loads(image.manifest_path.read_text())
    assert disk.stat().st_size == raw_disk_size(manifest["size"])
    fsck = subprocess.run([store.host_tool("e2fsck"), "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run([store.host_tool("debugfs"), "-R", "cat /opt/mvm/bin/mvm-agent", str(disk)],
                             capture_output=True, text=True)
    assert listing.stdout == (image.rootfs / "opt/mvm/bin/mvm-agent").read_text()
    mtime = disk.stat().st_mtime_ns
    assert image.ensure_raw_disk() == disk and disk.stat().st_mtime_ns == mtime  # cached


def test_superseded_builds_are_pruned_unless_in_use(built: Built, isolated_templates: Path, scratch_root: Scratch,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    isolated_templates.mkdir(parents=True)
    source = built("minimal").directory
    olds = []
    for i, day in enumerate(["01", "02", "03"]):  # three builds with older agents, oldest first
        old = isolated_templates / f"minimal-{i:016x}"
        subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(old)], check=True)
        manifest = json.loads((old / "manifest.json").read_text())
        manifest["built_at"] = f"2026-01-{day}T00:00:00+00:00"
        (old / "manifest.json").write_text(json.dumps(manifest))
        olds.append(old)
    (olds[0] / "rootfs.ext4").unlink(missing_ok=True)
    in_use = load_image(olds[0])
    assert in_use is not None
    scratch_root(in_use)  # a sandbox's overlay over the oldest build
    assert store.in_use(olds[0]) and not store.in_use(olds[1])

    monkeypatch.setattr(agent_install, "source_digest", lambda: "d" * 64)
    new = ensure_template("minimal", progress=lambda _: None)
    assert new.directory.exists()
    assert olds[2].exists()      # the previous build is kept
    assert not olds[1].exists()  # older ones go...
    assert olds[0].exists()      # ...unless a sandbox uses them


# ---- prune vs use, across processes ----------------------------------------------------

#: Another process holding a build in use, as a create booting from it (its supervisor,
#: for the sandbox's life) or a build copying from it does; it lets go when stdin closes.
_HOLDER = ("import sys\n"
           "from mvm.templates import store\n"
           "store.hold_use(sys.argv[1])\n"
           "print('held', flush=True)\n"
           "sys.stdin.read()\n")


def _mvmctl() -> str:
    return str(Path(sys.executable).with_name("mvmctl"))


def test_a_prune_in_another_process_never_removes_a_build_held_in_use(built: Built, isolated_templates: Path) -> None:
    isolated_templates.mkdir(parents=True)
    old = isolated_templates / "minimal-00000000000000ab"  # a build with another agent: not current
    subprocess.run(["cp", "-a", "--reflink=auto", str(built("minimal").directory), str(old)], check=True)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "digest": "ab" * 32}))
    assert [t["current"] for t in list_templates()] == [False]
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, old.name], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert not store.in_use(old)  # nothing mounted nor open inside: only the hold protects it
        pruned = subprocess.run([_mvmctl(), "template", "prune"], capture_output=True, text=True, timeout=120)
        assert pruned.returncode == 0, pruned.stderr
        assert load_image(old) is not None
        with pytest.raises(InvalidState, match="in use"):
            remove_template("minimal")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    pruned = subprocess.run([_mvmctl(), "template", "prune"], capture_output=True, text=True, timeout=120)
    assert pruned.returncode == 0, pruned.stderr
    assert not old.exists()


def _open_files(pid: int) -> list[str]:
    """What process ``pid`` has open (nothing once it exited)."""
    found = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return []
    for fd in fds:
        try:
            found.append(os.readlink(fd))
        except FileNotFoundError:
            continue
    return found


def test_a_sandbox_holds_its_template_for_its_life_against_other_processes() -> None:
    import mvm

    probe = ("import sys\n"
             "from mvm.templates import store\n"
             "print(store.held(sys.argv[1]))\n")
    with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="5m") as sb:
        assert sb.commands.run(["true"]).exit_code == 0
        key = ensure_template("python-3.13").directory.name
        supervisor = json.loads((sandboxes_dir() / sb.id / "state.json").read_text())["supervisor_pid"]
        use_lock = str(templates_dir() / ".locks" / f"{key}.use")
        assert use_lock in _open_files(supervisor)  # its supervisor holds it...
        held = subprocess.run([sys.executable, "-c", probe, key], capture_output=True, text=True, timeout=60)
        assert held.stdout == "True\n", held.stderr  # ...so a prune in any process skips it
    assert use_lock not in _open_files(supervisor)  # let go once destroyed (it may still run)
