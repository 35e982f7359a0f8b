"""Sealed VM snapshots against real QEMU (TCG) and real crypto, through the supervisor's own
save/restore path (``mvm.snapshots.save_restore``): the memory image streams QEMU -> sealer ->
store and back, and is never a plain file anywhere.

The proof uses fanotify: every file modified on this machine's filesystems while a save or a
restore runs is kept open (so even one deleted right after is still readable) and searched
for a canary that sits in guest RAM only (a tmpfs file). The same watch over a plain
backend snapshot (``exec:cat > memory.bin``) and over the old unseal-to-a-directory restore
must find it: the detector works.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shlex
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_vm_backend import Agent
from waiting import wait_for

from mvm.backends.base import SnapshotArtifacts
from mvm.errors import SandboxError, SnapshotTampered
from mvm import snapshots
from mvm.snapshots import SnapshotStore

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(300)]

MEMORY_MB = 256

# ---- fanotify: every file written while a block runs --------------------------------------

_FAN_CLOEXEC, _FAN_NONBLOCK, _FAN_UNLIMITED_QUEUE = 0x1, 0x2, 0x10
_FAN_MODIFY, _FAN_CLOSE_WRITE, _FAN_Q_OVERFLOW = 0x2, 0x8, 0x4000
_FAN_MARK_ADD, _FAN_MARK_FILESYSTEM = 0x1, 0x100
_AT_FDCWD = -100
_EVENT = struct.Struct("=IBBHQii")
_WRITABLE_FS = {"ext4", "ext3", "xfs", "btrfs", "tmpfs", "overlay", "f2fs", "zfs"}


class WriteWatch:
    """fanotify on every local filesystem: one open fd per inode modified while watching."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        fd = libc.fanotify_init(_FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_UNLIMITED_QUEUE, os.O_RDONLY | os.O_LARGEFILE)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        self.fd = fd
        self.marked: list[str] = []
        devices = set()
        for line in Path("/proc/self/mounts").read_text().splitlines():
            _, mountpoint, fstype = line.split()[:3]
            mountpoint = mountpoint.replace("\\040", " ")
            try:
                dev = os.stat(mountpoint).st_dev
            except OSError:
                continue
            if fstype not in _WRITABLE_FS or dev in devices:
                continue
            if libc.fanotify_mark(fd, _FAN_MARK_ADD | _FAN_MARK_FILESYSTEM, _FAN_MODIFY | _FAN_CLOSE_WRITE,
                                  _AT_FDCWD, mountpoint.encode()) == 0:
                devices.add(dev)
                self.marked.append(mountpoint)
        if os.stat("/").st_dev not in devices:
            os.close(fd)
            raise OSError("cannot watch the root filesystem")
        self.files: dict[tuple[int, int], tuple[int, str]] = {}
        self.overflow = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                length, _, _, _, mask, efd, _pid = _EVENT.unpack_from(data, offset)
                offset += length
                if mask & _FAN_Q_OVERFLOW:
                    self.overflow = True
                if efd < 0:
                    continue
                st = os.fstat(efd)
                key = (st.st_dev, st.st_ino)
                if key in self.files:
                    os.close(efd)
                else:
                    self.files[key] = (efd, os.readlink(f"/proc/self/fd/{efd}"))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain()
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        os.close(self.fd)
        assert not self.overflow, "fanotify lost events: the watch proves nothing"

    def containing(self, needle: bytes, ours: Path) -> list[str]:
        """Every watched file (as it is now, deleted ones too) holding ``needle``. A file
        that reads EIO lives on a filesystem shut down since (a namespace sandbox's disk
        image, destroyed by another test or process on this host): not a file this test's
        save or restore wrote, so none of ``ours`` may be one of those."""
        hits = []
        for efd, path in self.files.values():
            offset, tail = 0, b""
            while True:
                try:
                    block = os.pread(efd, 8 << 20, offset)
                except OSError as exc:
                    if exc.errno != errno.EIO or path.startswith(str(ours)):
                        raise
                    break
                if not block:
                    break
                if needle in tail + block:
                    hits.append(path)
                    break
                offset += len(block)
                tail = block[-len(needle):]
        return hits

    def close(self) -> None:
        for efd, _ in self.files.values():
            os.close(efd)
        self.files.clear()


def watched(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, WriteWatch]:
    watch = WriteWatch()
    try:
        result = fn(*args, **kwargs)
    finally:
        watch.stop()
    return result, watch


def _fanotify_works() -> str:
    try:
        WriteWatch().stop()
    except OSError as exc:
        return f"fanotify unavailable ({exc}); needs root and a kernel with FAN_MARK_FILESYSTEM"
    return ""


# ---- fixtures -------------------------------------------------------------------------------


class Source:
    def __init__(self, instance: Any, agent: Agent, canary: bytes):
        self.instance, self.agent, self.canary = instance, agent, canary


@pytest.fixture(scope="module")
def source(make_instance) -> Iterator[Source]:  # type: ignore[no-untyped-def]
    """A booted VM whose RAM (only) holds a canary: a tmpfs file, never on its disk."""
    instance = make_instance(memory_mb=MEMORY_MB)
    agent = Agent(instance.start())
    canary = f"mvm-canary-{secrets.token_hex(16)}".encode()
    agent.sh(f"yes {canary.decode()} | head -n 8192 > /tmp/canary.txt")
    agent.sh("echo on-disk > /root/disk.txt; sync")
    yield Source(instance, agent, canary)
    agent.close()
    instance.destroy()


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots")


def _save(source: Source, store: SnapshotStore, tmp_path: Path, name: str = "s") -> snapshots.Snapshot:
    info, _ = snapshots.save(source.instance, store, name, "sb-test", staging_parent=tmp_path)
    return info


def _memory_blob(store: SnapshotStore, info: snapshots.Snapshot) -> Path:
    manifest = snapshots.verify_snapshot(store.path(info))
    return store.path(info) / next(f.blob for f in manifest.files if f.path == "memory.bin")


# ---- tests ----------------------------------------------------------------------------------


def test_no_plaintext_memory_image_on_disk_during_save_or_restore(
    source: Source, store: SnapshotStore, make_instance, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    reason = _fanotify_works()
    if reason:
        pytest.skip(reason)
    # Positive control: a plain backend snapshot writes the image, and the watch sees the canary in it.
    plain_dir = tmp_path / "plain"
    _, watch = watched(source.instance.snapshot, plain_dir)
    try:
        assert str(plain_dir / "memory.bin") in watch.containing(source.canary, tmp_path)
    finally:
        watch.close()

    info, watch = watched(_save, source, store, tmp_path)
    try:
        blob = _memory_blob(store, info).stat()
        assert (blob.st_dev, blob.st_ino) in watch.files  # the sealed blob was watched being written...
        assert watch.containing(source.canary, tmp_path) == []  # ...and nothing written held plaintext memory
    finally:
        watch.close()
    assert info.kind == "full" and "memory.bin" in info.files
    assert info.details["memory_bytes"] > 32 << 20

    clone = make_instance(memory_mb=MEMORY_MB)
    (sock, restored), watch = watched(snapshots.restore, clone, store, info.id)
    try:
        assert watch.containing(source.canary, tmp_path) == []
    finally:
        watch.close()
    agent = Agent(sock)
    try:
        assert restored.id == info.id
        assert agent.sh("head -1 /tmp/canary.txt").strip() == source.canary.decode()  # RAM came back
        assert agent.sh("cat /root/disk.txt") == "on-disk\n"
    finally:
        agent.close()
        clone.destroy()

    # Positive control for restore: the old way (unseal everything to a directory) is caught.
    out, watch = watched(store.open_for_restore, info.id)
    try:
        assert str(out / "memory.bin") in watch.containing(source.canary, tmp_path)
    finally:
        watch.close()


_COUNTER = """\
import os, sys
n = 0
while block := os.read(0, 1 << 20):
    view = memoryview(block)
    while view:
        view = view[os.write(1, view):]
    n += len(block)
sh = os.getppid()  # the /bin/sh QEMU runs the exec: command with
with open(f"/proc/{sh}/stat") as fh:
    qemu = int(fh.read().rsplit(")", 1)[1].split()[1])
with open(f"/proc/{qemu}/comm") as fh:
    comm = fh.read().strip()
with open(sys.argv[1], "w") as fh:
    fh.write(f"{n} {qemu} {comm}")
"""


def _count_what_qemu_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> Path:
    """Put a byte counter between the unsealer and QEMU: ``unsealer | counter`` -> QEMU's
    incoming pipe. At EOF it writes ``<bytes QEMU was given> <QEMU's pid> <its comm>``."""
    script, out = tmp_path / "counter.py", tmp_path / f"{name}.count"
    script.write_text(_COUNTER)
    real = snapshots.UnsealSource.command

    def command(self: snapshots.UnsealSource) -> str:
        return f"{real(self)} | exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(out))}"

    monkeypatch.setattr(snapshots.UnsealSource, "command", command)
    return out


def _read_count(path: Path) -> tuple[int, int, str]:
    wait_for(path.exists, f"{path.name} to be written", interval=0.01)
    n, pid, comm = path.read_text().split(" ", 2)
    return int(n), int(pid), comm


def test_tampered_memory_gives_qemu_only_authentic_chunks_and_the_guest_never_runs(
    source: Source, store: SnapshotStore, make_instance, tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memory blob is verified while QEMU loads it: every chunk is authenticated before
    QEMU gets it, and the last one only once the whole blob's sha256 is the signed
    manifest's. A modified blob gives QEMU the authentic chunks before the modified one and
    then the end of the stream; another authentic blob (the same memory sealed again under
    this snapshot's key and context) gives it all but the last chunk. Either way the load
    cannot complete, QEMU is killed before the guest ran, and ``SnapshotTampered`` says why."""
    info = _save(source, store, tmp_path)
    manifest = snapshots.verify_snapshot(store.path(info))
    chunk = manifest.chunk_size
    # Positive control: the counter sees the whole image go to QEMU when nothing is wrong.
    counted = _count_what_qemu_reads(monkeypatch, tmp_path, "intact")
    clone = make_instance(memory_mb=MEMORY_MB)
    sock, _ = snapshots.restore(clone, store, info.id)
    agent = Agent(sock)
    try:
        assert agent.sh("head -1 /tmp/canary.txt").strip() == source.canary.decode()
    finally:
        agent.close()
        clone.destroy()
    n, _, comm = _read_count(counted)
    size = info.details["memory_bytes"]
    assert n == size > 32 << 20 and comm.startswith("qemu")

    blob = _memory_blob(store, info)
    original = blob.read_bytes()
    middle = len(original) // 2
    bad_chunk = (middle - snapshots.HEADER_SIZE) // (chunk + snapshots.TAG_SIZE)
    with open(blob, "r+b") as fh:
        fh.seek(middle)
        fh.write(bytes([original[middle] ^ 0x01]))

    def refused(name: str, match: str) -> int:
        counted = _count_what_qemu_reads(monkeypatch, tmp_path, name)
        clone = make_instance(memory_mb=MEMORY_MB)
        with pytest.raises(SnapshotTampered, match=match) as err:
            snapshots.restore(clone, store, info.id)
        assert err.value.details["path"] == "memory.bin"
        n, qemu_pid, comm = _read_count(counted)
        assert comm.startswith("qemu") and not Path(f"/proc/{qemu_pid}").exists()  # QEMU read it, and is gone
        assert clone.host_pids() == [] and clone.describe()["state"] == "stopped"
        assert sorted(p.name for p in store.root.iterdir() if p.name != ".lock") == [info.id]  # nothing unsealed
        return n

    assert refused("tampered", f"chunk {bad_chunk} fails authentication") == bad_chunk * chunk

    # The very memory sealed again (the original blob unsealed, then sealed anew): every
    # chunk authenticates, but it is not the blob the manifest lists.
    plain = tmp_path / "memory.plain"
    blob.write_bytes(original)
    snapshots.unseal_file(blob, plain, store.key, context=manifest.context("memory.bin"))
    snapshots.seal_file(plain, blob, store.key, context=manifest.context("memory.bin"), chunk_size=chunk)
    plain.unlink()
    assert refused("resealed", "sha256 does not match the manifest") == size - (size % chunk or chunk)


def test_memory_changed_after_verification_fails_hard_at_the_unsealer(
    source: Source, store: SnapshotStore, make_instance, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    info = _save(source, store, tmp_path)
    clone = make_instance(memory_mb=MEMORY_MB)
    with store.restoring(info.id, stream=["memory.bin"]) as opened:
        entry = next(f for f in opened.manifest.files if f.path == "memory.bin")
        with open(store.path(info) / entry.blob, "r+b") as fh:  # same inode as the verified fd
            fh.seek(entry.sealed_size * 2 // 3)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0x01]))
        artifacts = SnapshotArtifacts(kind="full", files=tuple(opened.info.files),
                                      details=dict(opened.info.details), streamed=("memory.bin",))
        with pytest.raises(SnapshotTampered, match="fails authentication") as err:
            clone.restore(opened.path, artifacts, memory_source=opened.source("memory.bin"))
    assert err.value.details["path"] == "memory.bin"
    assert clone.host_pids() == [] and clone.describe()["state"] == "stopped"  # QEMU was killed


def test_sealer_killed_mid_stream_leaves_no_half_snapshot(
    source: Source, store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sinks: list[snapshots.SealSink] = []
    real_stream = snapshots.PendingSnapshot.stream

    def stream(self: snapshots.PendingSnapshot, rel: str) -> snapshots.SealSink:
        sinks.append(real_stream(self, rel))
        return sinks[-1]

    monkeypatch.setattr(snapshots.PendingSnapshot, "stream", stream)
    outcome: dict[str, Any] = {}

    def save() -> None:
        try:
            outcome["info"] = _save(source, store, tmp_path, "killed")
        except Exception as exc:  # inspected below
            outcome["error"] = exc

    thread = threading.Thread(target=save)
    thread.start()
    wait_for(lambda: (sinks and sinks[0].helper_pid is not None) or not thread.is_alive(), "the sealer to start",
             interval=0.001)
    assert sinks and sinks[0].helper_pid, "the sealer never started"
    pid = sinks[0].helper_pid
    os.kill(pid, signal.SIGSTOP)  # freeze it mid-stream (QEMU now blocks on the pipe), then kill it
    staged = [p for p in store.root.iterdir() if p.name.startswith(".staging-")]
    assert staged, "the pending snapshot should be staged while the sealer runs"
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert "error" in outcome, f"the save should have failed, got {outcome}"
    assert isinstance(outcome["error"], SandboxError)
    assert "memory snapshot failed" in str(outcome["error"]) or "sealing memory.bin" in str(outcome["error"])
    assert store.list() == [] and store.problems() == {}
    assert sorted(p.name for p in store.root.iterdir() if p.name != ".lock") == []  # no staging, no snapshot
    assert list(tmp_path.glob("snap-*")) == []
    # The sandbox is unharmed and the next snapshot works.
    assert source.agent.sh("echo alive") == "alive\n"
    monkeypatch.undo()
    info = _save(source, store, tmp_path, "after")
    assert [i.name for i in store.list()] == ["after"]
    snapshots.verify_snapshot(store.path(info))
