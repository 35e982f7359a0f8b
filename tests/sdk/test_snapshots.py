"""pause/resume and sealed snapshots through the SDK, on every backend.

A VM snapshot is ``kind="full"`` (memory, processes, tmpfs and disk survive); a
namespace snapshot is ``kind="filesystem"`` (the writable layer only) and must
never claim more.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from waiting import wait_for

import mvm
from mvm import errors
from mvm.paths import snapshots_dir

TEMPLATE = "python-3.13"
COUNTER = (
    "import time\nn = 0\nwhile True:\n    n += 1\n    open('/tmp/count', 'w').write(str(n))\n    time.sleep(0.05)\n"
)


def mvmctl(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "mvm.cli", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def _count(sb: mvm.Sandbox) -> int:
    return int(sb.files.read("/tmp/count") or b"0")


def test_pause_freezes_execution_and_resume_continues(backend: str) -> None:
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m") as sb:
        sb.files.write("/tmp/counter.py", COUNTER)
        sb.commands.start(["python", "/tmp/counter.py"])
        wait_for(lambda: sb.files.exists("/tmp/count"), "the counter's first write")
        assert sb.pause().state == "paused"
        with pytest.raises(errors.SandboxPaused, match="paused"):
            sb.files.read("/tmp/count")
        with pytest.raises(errors.SandboxPaused):
            sb.commands.run(["true"])
        # auto_resume is an explicit opt-in
        assert sb.commands.run(["cat", "/tmp/count"], auto_resume=True).exit_code == 0
        assert sb.describe().state == "running"
        sb.pause()
        assert sb.resume().state == "running"
        frozen = _count(sb)
        wait_for(lambda: _count(sb) > frozen, "the counter counting again after resume")


def test_snapshot_restore_and_fork(backend: str) -> None:
    shape = mvm.resources(cpu_cores=2, memory_mb=384)
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m", resources=shape) as source:
        source.files.write("/srv/on-disk.txt", "disk state")
        source.files.write("/tmp/in-tmp.txt", "tmp state")
        long_running = source.commands.start(["sleep", "600"])
        snap = source.snapshot(name="after-index", expires="1h")
        assert isinstance(snap, mvm.Snapshot)
        assert snap.kind == ("full" if backend == "vm" else "filesystem")
        assert snap.expires_at and snap.expires_at - time.time() > 3000
        source.files.write("/srv/on-disk.txt", "changed after the snapshot")

        # no resources given: a restore takes the snapshot's shape (the SDK and mvmctl up alike)
        clones = [mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m", from_snapshot=snap.id)]
        made = mvmctl("up", "--backend", backend, "--ttl", "10m", "--from-snapshot", snap.id, "--json")
        clones.append(mvm.Sandbox.connect(json.loads(made.stdout)["id"]))
        try:
            for clone in clones:
                assert clone.describe().resources == dataclasses.asdict(shape)
                assert clone.files.read("/srv/on-disk.txt") == b"disk state"
                if backend == "vm":
                    assert clone.files.read("/tmp/in-tmp.txt") == b"tmp state"
                    alive = clone.commands.run(["sh", "-c", f"test -d /proc/{long_running.pid} && echo alive"])
                    assert alive.stdout == "alive\n"
            clones[0].files.write("/srv/on-disk.txt", "fork 0")
            assert clones[1].files.read("/srv/on-disk.txt") == b"disk state"
            other = mvm.resources(cpu_cores=1, memory_mb=512)
            if backend == "vm":  # a memory image has one shape: asking for another is refused, saying how
                refused = r"memory_mb: snapshot has 384, this sandbox has 512.*without resources="
                with pytest.raises(errors.InvalidArgument, match=refused):
                    mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m", from_snapshot=snap.id, resources=other)
            else:  # a file system fits any shape: the one asked for
                clones.append(mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m", from_snapshot=snap.id,
                                                 resources=other))
                assert clones[-1].describe().resources == dataclasses.asdict(other)
        finally:
            for clone in clones:
                clone.kill()

        # resume(snapshot=...) rolls the source itself back
        source.resume(snapshot=snap.id)
        assert source.files.read("/srv/on-disk.txt") == b"disk state"


def test_snapshots_are_sealed_and_tampering_is_refused(backend: str) -> None:
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m") as sb:
        sb.files.write("/srv/secret-ish.txt", "plaintext-canary-in-a-snapshot")
        snap = sb.snapshot(name="sealed")
        directory = next(p for p in snapshots_dir().iterdir() if p.name == snap.id)
        for blob in directory.rglob("*"):
            if blob.is_file():
                assert b"plaintext-canary-in-a-snapshot" not in blob.read_bytes()
                assert blob.stat().st_mode & 0o077 == 0
        blob = max((p for p in directory.rglob("*.sealed")), key=lambda p: p.stat().st_size)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
        with pytest.raises(errors.SnapshotTampered):
            mvm.Sandbox.create(TEMPLATE, backend=backend, from_snapshot=snap.id)


def test_destroy_deletes_snapshots_unless_kept(backend: str) -> None:
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m") as sb:
        gone = sb.snapshot(name="temporary")
        kept = sb.snapshot(name="kept", keep=True)
    remaining = {p.name for p in snapshots_dir().iterdir() if p.name.startswith("snap_")}
    assert gone.id not in remaining
    assert kept.id in remaining
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m", from_snapshot=kept.id) as restored:
        assert restored.describe().state == "running"
