"""Streamed sealing without QEMU: the helper process run through ``sh -c`` exactly as QEMU's
``exec:`` migration runs it, the pending snapshot that adopts its blob, and the unsealer
that streams a verified blob back."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mvm
from mvm.errors import InvalidArgument, SandboxError, SnapshotTampered
from mvm.snapshots import (
    HEADER_SIZE,
    TAG_SIZE,
    Snapshot,
    SnapshotStore,
    seal_file,
    snapshot_key,
    unseal_file,
    verify_snapshot,
)
from mvm.snapshots.streams import _stream_dir, sweep_stale_stream_dirs

CHUNK = 4096


def _data(size: int) -> bytes:
    out = bytearray()
    block = b"seed"
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 32
    return bytes(out[:size])


def _run(command: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """What QEMU does with ``exec:COMMAND``: ``/bin/sh -c COMMAND`` with the stream on a pipe."""
    return subprocess.run(["/bin/sh", "-c", command], input=data, stdout=None if data is not None else subprocess.PIPE,
                          timeout=60)


def _leftovers(store: SnapshotStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name != ".lock")


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots", chunk_size=CHUNK)


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 7, 2 << 20])
def test_streamed_blob_round_trips_and_is_a_sealed_file(store: SnapshotStore, tmp_path: Path, size: int) -> None:
    memory = _data(size)
    files = tmp_path / "files"
    files.mkdir()
    (files / "vm.json").write_text("{}")
    with store.begin("s", "sb-1") as pending:
        sink = pending.stream("memory.bin")
        assert _run(sink.command(), memory).returncode == 0
        assert sink.finish() == size
        info = pending.commit("full", files, details={"x": 1})
    assert info.files == ("memory.bin", "vm.json") and info.plain_bytes == size + 2
    manifest = verify_snapshot(store.path(info), key=snapshot_key())
    entry = next(f for f in manifest.files if f.path == "memory.bin")
    blob = store.path(info) / entry.blob
    assert entry.sealed_sha256 == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert blob.stat().st_size == HEADER_SIZE + size + TAG_SIZE * max(1, -(-size // CHUNK))
    assert blob.stat().st_mode & 0o777 == 0o600
    if size >= 64:
        assert memory[:64] not in blob.read_bytes()
    # the same format seal_file writes: unseal_file reads it
    assert unseal_file(blob, tmp_path / "out", snapshot_key(), context=manifest.context("memory.bin")) == size
    assert (tmp_path / "out").read_bytes() == memory
    # ...and streamed back out by the unsealer
    with store.restoring(info.id, stream=["memory.bin"]) as opened:
        assert sorted(os.listdir(opened.path)) == ["vm.json"]  # the streamed file is never unsealed to disk
        source = opened.source("memory.bin")
        assert source is not None
        out = _run(source.command())
        source.finish()
        assert out.returncode == 0 and out.stdout == memory
    assert _leftovers(store) == [info.id]


def test_the_key_is_on_no_command_line_and_in_no_environment(store: SnapshotStore) -> None:
    key = snapshot_key()
    with store.begin("s", "sb-1") as pending:
        sink = pending.stream("memory.bin")
        command = sink.command()
        assert key.hex() not in command
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while sink.helper_pid is None and time.monotonic() < deadline:  # connected: it holds the key now
                time.sleep(0.005)
            # sh exec'd the helper, which forked the worker that holds the key (same argv and env)
            assert sink.helper_pid and sink.helper_pid != proc.pid
            for name in ("cmdline", "environ"):
                seen = Path(f"/proc/{sink.helper_pid}/{name}").read_bytes()
                assert b"seal_stream.py" in seen or name == "environ"
                assert key not in seen and key.hex().encode() not in seen and key.hex().upper().encode() not in seen
            assert proc.wait(20) == 0  # the process the caller started ends at once...
            assert proc.stdin is not None
            proc.stdin.write(b"x" * 10000)  # ...while its worker keeps reading the stream
            proc.stdin.close()
        finally:
            proc.kill()
        assert sink.finish() == 10000


def test_only_our_uid_reaches_the_control_socket(store: SnapshotStore) -> None:
    with store.begin("s", "sb-1") as pending:
        sink = pending.stream("memory.bin")
        control = sink.command().rsplit(" ", 1)[1]
        assert Path(control).parent.stat().st_mode & 0o777 == 0o700
        if os.geteuid() != 0:
            pytest.skip("needs root to try from another uid")
        pid = os.fork()
        if pid == 0:  # another user: the private directory keeps it out
            import socket

            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(control)
            except PermissionError:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert sink.helper_pid is None


def test_a_killed_sealer_leaves_no_half_snapshot(store: SnapshotStore, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "vm.json").write_text("{}")
    pending = store.begin("s", "sb-1")
    sink = pending.stream("memory.bin")
    proc = subprocess.Popen(["/bin/sh", "-c", sink.command()], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(_data(3 * CHUNK))
    proc.stdin.flush()
    blob = pending.staging / sink.blob
    deadline = time.monotonic() + 20
    while blob.stat().st_size < HEADER_SIZE + CHUNK and time.monotonic() < deadline:
        time.sleep(0.005)
    assert blob.stat().st_size >= HEADER_SIZE + CHUNK  # mid-stream
    assert sink.helper_pid
    os.kill(sink.helper_pid, signal.SIGKILL)  # the worker: the process sh started has exited already
    proc.wait(10)
    with pytest.raises(SandboxError, match=r"sealing memory\.bin failed.*without an answer"):
        pending.commit("full", files)
    assert _leftovers(store) == []  # no staging directory, no snapshot
    assert store.list() == []


def test_a_blob_changed_after_verification_fails_at_the_unsealer(store: SnapshotStore, tmp_path: Path) -> None:
    memory = _data(8 * CHUNK)
    with store.begin("s", "sb-1") as pending:
        sink = pending.stream("memory.bin")
        _run(sink.command(), memory)
        sink.finish()
        info = pending.commit("full")
    with store.restoring(info.id, stream=["memory.bin"]) as opened:
        entry = next(f for f in opened.manifest.files if f.path == "memory.bin")
        # Verified; now chunk 5 changes on disk before the unsealer reads it (same inode).
        with open(store.path(info) / entry.blob, "r+b") as fh:
            fh.seek(HEADER_SIZE + 5 * (CHUNK + TAG_SIZE) + 10)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 1]))
        source = opened.source("memory.bin")
        assert source is not None
        out = _run(source.command())
        assert out.stdout == memory[: 5 * CHUNK]  # stopped before the bad chunk's plaintext
        with pytest.raises(SnapshotTampered, match="chunk 5 fails authentication") as err:
            source.finish()
        assert err.value.details["path"] == "memory.bin" and err.value.details["snapshot"] == info.id


def test_a_truncated_streamed_blob_is_refused_before_anything_streams(store: SnapshotStore) -> None:
    info = _streamed_snapshot(store, _data(4 * CHUNK))
    blob = next(store.path(info).rglob("*.sealed"))
    data = blob.read_bytes()
    blob.write_bytes(data[: -(CHUNK + TAG_SIZE)])  # a whole chunk gone: only the size says so up front
    with pytest.raises(SnapshotTampered, match="truncated or extended"):
        with store.restoring(info.id, stream=["memory.bin"]):
            pytest.fail("the snapshot was opened")
    assert _leftovers(store) == [info.id]


def _streamed_snapshot(store: SnapshotStore, memory: bytes) -> Snapshot:
    with store.begin("s", "sb-1") as pending:
        sink = pending.stream("memory.bin")
        _run(sink.command(), memory)
        sink.finish()
        return pending.commit("full")


def test_a_streamed_blob_is_read_once_and_verified_as_it_streams(store: SnapshotStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    memory = _data(64 * CHUNK + 5)
    info = _streamed_snapshot(store, memory)
    hashed: list[str] = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda fh, name: hashed.append(name) or real(fh, name))
    with store.restoring(info.id, stream=["memory.bin"]) as opened:
        source = opened.source("memory.bin")
        assert source is not None
        out = _run(source.command())
        source.finish()
        assert out.returncode == 0 and out.stdout == memory
    assert hashed == []  # no pass over the blob before it streamed: its unsealer checked the sha256
    assert _leftovers(store) == [info.id]


def test_a_tampered_streamed_blob_gives_its_reader_only_the_authentic_chunks_before(store: SnapshotStore) -> None:
    memory = _data(64 * CHUNK)
    info = _streamed_snapshot(store, memory)
    blob = next(store.path(info).rglob("*.sealed"))
    data = bytearray(blob.read_bytes())
    data[HEADER_SIZE + 40 * (CHUNK + TAG_SIZE) + 7] ^= 1
    blob.write_bytes(bytes(data))
    with store.restoring(info.id, stream=["memory.bin"]) as opened:
        source = opened.source("memory.bin")
        assert source is not None
        out = _run(source.command())
        assert out.stdout == memory[: 40 * CHUNK]  # never a modified byte, and never the whole
        with pytest.raises(SnapshotTampered, match="chunk 40 fails authentication") as err:
            source.finish()
        assert err.value.details["path"] == "memory.bin" and err.value.details["snapshot"] == info.id
    assert _leftovers(store) == [info.id]


def test_an_authentic_blob_other_than_the_listed_one_never_completes(store: SnapshotStore, tmp_path: Path) -> None:
    """A blob that passes authentication chunk by chunk but is not the one the signed
    manifest lists (the same plaintext sealed again, under this snapshot's key and
    context, e.g. from an earlier save of the same id): the unsealer withholds its last
    chunk, so its reader never gets a complete stream, and the verdict names the hash."""
    memory = _data(8 * CHUNK + 3)
    info = _streamed_snapshot(store, memory)
    manifest = verify_snapshot(store.path(info))
    entry = next(f for f in manifest.files if f.path == "memory.bin")
    plain = tmp_path / "memory.plain"
    plain.write_bytes(memory)
    seal_file(plain, store.path(info) / entry.blob, store.key, context=manifest.context("memory.bin"),
              chunk_size=CHUNK)
    with store.restoring(info.id, stream=["memory.bin"]) as opened:
        source = opened.source("memory.bin")
        assert source is not None
        out = _run(source.command())
        assert out.stdout == memory[: 8 * CHUNK]  # all but the last chunk
        with pytest.raises(SnapshotTampered, match="sha256 does not match the manifest") as err:
            source.finish()
        assert err.value.details["path"] == "memory.bin"
    assert _leftovers(store) == [info.id]


def test_streaming_still_checks_everything_else_first(store: SnapshotStore, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "vm.json").write_text("{}")
    with store.begin("s", "sb-1") as pending:
        sink = pending.stream("memory.bin")
        _run(sink.command(), _data(4 * CHUNK))
        sink.finish()
        info = pending.commit("full", files)
    manifest = verify_snapshot(store.path(info))
    other = store.path(info) / next(f.blob for f in manifest.files if f.path == "vm.json")
    data = bytearray(other.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    with pytest.raises(SnapshotTampered, match="sha256 does not match") as err:
        with store.restoring(info.id, stream=["memory.bin"]):
            pytest.fail("the snapshot was opened")
    assert err.value.details["path"] == "vm.json"
    assert _leftovers(store) == [info.id]


def test_pending_snapshot_checks_and_discards(store: SnapshotStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a valid snapshot name"):
        store.begin("../x", "sb-1")
    with pytest.raises(InvalidArgument, match="expires"):
        store.begin("s", "sb-1", expires="soon")
    assert _leftovers(store) == []
    with store.begin("s", "sb-1") as pending:
        pending.stream("memory.bin")
        with pytest.raises(InvalidArgument, match="already streamed"):
            pending.stream("memory.bin")
        with pytest.raises(InvalidArgument, match="safe relative path"):
            pending.stream("../memory.bin")
        assert pending.staging.is_dir()
    assert _leftovers(store) == []  # left without commit: discarded
    store.create("s", "sb-1", "full", tmp_path)  # an empty snapshot, to take the name
    with pytest.raises(InvalidArgument, match="already has a snapshot named"):
        store.begin("s", "sb-1")


_DIES_WITH_A_STREAM_OPEN = r"""
import os, signal, sys
from mvm.snapshots.streams import _stream_dir
path = _stream_dir()
(path / "ctl").touch()
print(path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # never closes: as a supervisor killed mid save or restore
"""


def test_a_killed_process_control_socket_directory_is_swept() -> None:
    """The directory of a stream whose process was SIGKILLed goes at the next stream or gc;
    a live process's stays."""

    def left_by_a_killed_process() -> Path:
        done = subprocess.run([sys.executable, "-c", _DIES_WITH_A_STREAM_OPEN], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == -signal.SIGKILL, done.stderr
        path = Path(done.stdout.strip())
        assert (path / "ctl").exists()
        return path

    mine = _stream_dir()
    try:
        stale = left_by_a_killed_process()
        sweep_stale_stream_dirs()
        assert not stale.exists() and mine.is_dir()
        stale = left_by_a_killed_process()
        _stream_dir().rmdir()  # a new stream sweeps first
        assert not stale.exists() and mine.is_dir()
        stale = left_by_a_killed_process()
        mvm.gc()
        assert not stale.exists() and mine.is_dir()
    finally:
        mine.rmdir()
