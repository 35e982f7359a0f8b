"""A full disk under ``MVM_HOME`` (a small ext4 file system on a loop device, made and
removed by the test) during a snapshot save, and under ``MVM_TEMPLATES`` during a
template build: a clear error, the earlier snapshots intact, nothing half-made visible,
and it works again once there is room."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_for

import mvm
from mvm import errors
from mvm.backends import PREFERENCE, availability
from mvm.paths import templates_dir
from mvm.snapshots import SnapshotStore
from mvm.templates import builder

BACKENDS = [name for name in PREFERENCE if availability(name).ok] or ["namespace"]
MiB = 1 << 20
SHARED_TEMPLATES = str(templates_dir())  # the tests' shared cache, before a test moves MVM_TEMPLATES


@pytest.fixture
def small_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``MVM_HOME`` on a fresh 1 GiB ext4 file system (sandboxes, snapshots, keys)."""
    yield from _small_fs(tmp_path, monkeypatch, "MVM_HOME", 1024 * MiB)


@pytest.fixture
def small_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``MVM_TEMPLATES`` on a fresh 320 MiB ext4 file system."""
    yield from _small_fs(tmp_path, monkeypatch, "MVM_TEMPLATES", 320 * MiB)


def _small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, size: int) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a loop file system needs root")
    image = tmp_path / f"{variable}.ext4"
    mount = Path(tempfile.mkdtemp(prefix="mvmf-", dir="/tmp"))  # short: sockets live under MVM_HOME
    with open(image, "wb") as fh:
        fh.truncate(size)  # sparse: costs only what is written
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        monkeypatch.setenv(variable, str(mount))
        yield mount
    finally:
        # the supervisor exits right after answering destroy; a process that stays keeps it busy
        wait_for(lambda: subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0,
                 "the small file system to be unmounted (nothing of the sandbox left on it)", timeout=60)
        image.unlink()
        mount.rmdir()


def _fill(directory: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``directory``'s file system."""
    ballast = directory / "ballast"
    free = shutil.disk_usage(directory).free
    subprocess.run(["fallocate", "-l", str(max(free - leave, 0)), str(ballast)], check=True)
    return ballast


@pytest.mark.parametrize("backend", BACKENDS)
def test_snapshot_save_on_a_full_disk(small_home: Path, backend: str) -> None:
    store = SnapshotStore()
    with mvm.Sandbox.create("python-3.13", backend=backend, ttl="10m") as sb:
        sb.files.write("/w/state", os.urandom(24 * MiB))
        first = sb.snapshot("first")
        ballast = _fill(small_home, leave=4 * MiB)
        with pytest.raises(errors.SandboxError, match=r"not saved: .*No space left on device"):
            sb.snapshot("second")
        assert [s.id for s in store.list()] == [first.id]  # nothing half-written is listed
        assert not list(store.root.glob(".staging-*"))
        store.verify(first.id)  # the earlier snapshot is intact
        assert sb.describe().state == "running"  # and the sandbox goes on
        assert sb.commands.run(["cat", "/proc/uptime"]).exit_code == 0
        ballast.unlink()
        second = sb.snapshot("second")  # room again: it works
        store.verify(second.id)
        sb.resume(snapshot=first.id)
        assert len(sb.files.read("/w/state", max_bytes=32 * MiB)) == 24 * MiB


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in (".locks", "ballast"))


def test_template_build_on_a_full_disk(small_templates: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a build of the same recipe by another agent version: the build copies its rootfs
    with pytest.MonkeyPatch.context() as shared:
        shared.setenv("MVM_TEMPLATES", SHARED_TEMPLATES)
        current = builder.ensure_template("python-3.13")
    seed = small_templates / "python-3.13-0000000000000000"
    seed.mkdir()
    for name in ("rootfs", "manifest.json", "recipe.json"):
        subprocess.run(["cp", "-a", str(current.directory / name), str(seed / name)], check=True)
    before = _entries(small_templates)

    # less free than a build needs: refused up front, saying how much there is and where to go
    with pytest.raises(errors.TemplateBuildError, match=r"only \d+ MiB free .*set MVM_TEMPLATES"):
        builder.ensure_template("python-3.13")
    assert _entries(small_templates) == before

    # the disk fills up during the build itself (the up-front margin lowered for it)
    monkeypatch.setattr(builder, "MIN_FREE_BYTES", 0)
    ballast = _fill(small_templates, leave=24 * MiB)
    with pytest.raises(errors.TemplateBuildError, match="No space left on device"):
        builder.ensure_template("python-3.13")
    assert _entries(small_templates) == before  # no partial build, visible or hidden
    assert [t["path"] for t in builder.list_templates()] == [str(seed)]

    ballast.unlink()  # room again: the build goes through
    built = builder.ensure_template("python-3.13")
    assert built.directory.parent == small_templates and (built.rootfs / "usr/bin").is_dir()
