from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

from mvm.errors import InvalidArgument, SnapshotTampered
from mvm.snapshots import HEADER_SIZE, TAG_SIZE, seal_file, unseal_file

CHUNK = 4096
KEY = bytes(range(32))


def _data(size: int, seed: int = 1) -> bytes:
    out = b""
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 16
    return out[:size]


def _sealed(tmp_path: Path, size: int = CHUNK * 5 + 100, context: bytes = b"ctx") -> tuple[Path, bytes]:
    plain = _data(size)
    src = tmp_path / "plain.bin"
    src.write_bytes(plain)
    dst = tmp_path / "sealed.bin"
    info = seal_file(src, dst, KEY, context=context, chunk_size=CHUNK)
    assert info.size == size and info.sealed_size == dst.stat().st_size
    assert info.sealed_sha256 == hashlib.sha256(dst.read_bytes()).hexdigest()
    return dst, plain


def _chunk_at(i: int) -> int:
    return HEADER_SIZE + i * (CHUNK + TAG_SIZE)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_round_trip(tmp_path: Path, mvm_home: Path, size: int) -> None:
    dst, plain = _sealed(tmp_path, size)
    assert (dst.stat().st_mode & 0o777) == 0o600
    chunks = max(1, -(-size // CHUNK))
    assert dst.stat().st_size == HEADER_SIZE + size + TAG_SIZE * chunks
    if size >= 64:
        assert plain[:64] not in dst.read_bytes()
    out = tmp_path / "out.bin"
    assert unseal_file(dst, out, KEY, context=b"ctx") == size
    assert out.read_bytes() == plain
    assert (out.stat().st_mode & 0o777) == 0o600


def _expect_tampered(sealed: Path, tmp_path: Path, *, context: bytes = b"ctx", key: bytes = KEY) -> str:
    out = tmp_path / "out.bin"
    with pytest.raises(SnapshotTampered) as info:
        unseal_file(sealed, out, key, context=context, name="memory.img")
    assert not out.exists(), "a partly unsealed file was left behind"
    assert info.value.details["file"] == "memory.img" and "memory.img" in str(info.value)
    return str(info.value)


def test_flipped_byte_in_any_chunk_or_header(tmp_path: Path, mvm_home: Path) -> None:
    sealed, _ = _sealed(tmp_path)
    pristine = sealed.read_bytes()
    for offset, words in [(_chunk_at(2) + 10, "chunk 2"), (_chunk_at(5) + 3, "chunk 5"),
                          (_chunk_at(1) - 1, "chunk 0"), (20, "chunk 0"), (13, "")]:
        raw = bytearray(pristine)
        raw[offset] ^= 0x01
        sealed.write_bytes(bytes(raw))
        assert words in _expect_tampered(sealed, tmp_path)
    sealed.write_bytes(pristine[:8].replace(b"MVMSEAL1", b"XXXXXXXX") + pristine[8:])
    assert "header" in _expect_tampered(sealed, tmp_path)


def test_truncation_and_extension(tmp_path: Path, mvm_home: Path) -> None:
    sealed, _ = _sealed(tmp_path)
    pristine = sealed.read_bytes()
    for cut in (_chunk_at(5), _chunk_at(3), _chunk_at(1), len(pristine) - 1, _chunk_at(2) + 100, HEADER_SIZE, 10):
        sealed.write_bytes(pristine[:cut])
        _expect_tampered(sealed, tmp_path)
    sealed.write_bytes(pristine + pristine[_chunk_at(5):])  # last chunk appended again
    _expect_tampered(sealed, tmp_path)


def test_reordered_or_swapped_chunks(tmp_path: Path, mvm_home: Path) -> None:
    sealed, _ = _sealed(tmp_path)
    raw = sealed.read_bytes()
    c = [raw[_chunk_at(i):_chunk_at(i + 1)] for i in range(5)]
    tail = raw[_chunk_at(5):]
    sealed.write_bytes(raw[:HEADER_SIZE] + c[0] + c[2] + c[1] + c[3] + c[4] + tail)
    assert "chunk 1" in _expect_tampered(sealed, tmp_path)
    # a chunk taken from another sealed file (same key, same offset)
    (tmp_path / "other").mkdir()
    other, _ = _sealed(tmp_path / "other", CHUNK * 5 + 100)
    other_raw = other.read_bytes()
    assert other_raw != raw
    sealed.write_bytes(raw[:_chunk_at(3)] + other_raw[_chunk_at(3):_chunk_at(4)] + raw[_chunk_at(4):])
    _expect_tampered(sealed, tmp_path)


def test_swapped_files_wrong_context_wrong_key(tmp_path: Path, mvm_home: Path) -> None:
    sealed, plain = _sealed(tmp_path, context=b"snap_1\0memory.img")
    _expect_tampered(sealed, tmp_path, context=b"snap_1\0disk.qcow2")
    _expect_tampered(sealed, tmp_path, context=b"snap_2\0memory.img")
    _expect_tampered(sealed, tmp_path, context=b"snap_1\0memory.img", key=bytes(32))
    out = tmp_path / "ok.bin"
    unseal_file(sealed, out, KEY, context=b"snap_1\0memory.img")
    assert out.read_bytes() == plain


def test_bad_parameters(tmp_path: Path) -> None:
    src = tmp_path / "p"
    src.write_bytes(b"x")
    with pytest.raises(InvalidArgument) as info:
        seal_file(src, tmp_path / "s", b"short")
    assert info.value.field == "key"
    with pytest.raises(InvalidArgument) as info:
        seal_file(src, tmp_path / "s", KEY, chunk_size=10)
    assert info.value.field == "chunk_size"


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def test_memory_stays_bounded_for_a_256_mib_file(tmp_path: Path, mvm_home: Path) -> None:
    size = 256 << 20
    src = tmp_path / "big.img"
    with open(src, "wb") as fh:  # sparse-ish: holes with some random 1 MiB extents
        fh.truncate(size)
        for i in range(0, size, 32 << 20):
            fh.seek(i + 4096)
            fh.write(os.urandom(1 << 20))
    sealed, out = tmp_path / "big.sealed", tmp_path / "big.out"
    rss_ok = _reset_hwm()
    rss_before = _vm_hwm_kib()
    tracemalloc.start()
    try:
        info = seal_file(src, sealed, KEY, context=b"big", fsync=False)
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        unseal_file(sealed, out, KEY, context=b"big")
        _, unseal_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_after = _vm_hwm_kib()
    assert info.size == size and out.stat().st_size == size
    assert seal_peak < 8 << 20, f"sealing peaked at {seal_peak >> 20} MiB of Python allocations"
    assert unseal_peak < 8 << 20, f"unsealing peaked at {unseal_peak >> 20} MiB of Python allocations"
    if rss_ok and rss_before is not None and rss_after is not None:
        grew_mib = (rss_after - rss_before) / 1024
        assert grew_mib < 64, f"peak RSS grew by {grew_mib:.0f} MiB for a 256 MiB file"
    with open(src, "rb") as a, open(out, "rb") as b:
        assert hashlib.file_digest(a, "sha256").digest() == hashlib.file_digest(b, "sha256").digest()
