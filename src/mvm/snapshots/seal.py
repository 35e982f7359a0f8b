"""The seal format: files encrypted chunk by chunk with AES-256-GCM (the chunk codec
itself is :mod:`.seal_stream`, shared with the helper process QEMU streams through).

Sealed file format (``seal_file``)::

    header (40 bytes): b"MVMSEAL1" | version u8 = 1 | 3 zero bytes | chunk_size u32 BE
                       | salt (16 random bytes) | nonce prefix (8 random bytes)
    chunk 0 .. chunk n: AES-256-GCM(ciphertext || 16-byte tag) of chunk_size plaintext bytes
                        (the last chunk 0..chunk_size bytes; an empty file is one empty chunk)

* file key  = HKDF-SHA256(master key, salt, info="mvm-seal-v1") — a fresh key per file;
* nonce(i)  = nonce prefix || i (u32 BE);
* AD(i)     = header || i (u64 BE) || final flag (1 byte) || context.

So flipping a byte, truncating (even at a chunk boundary), appending, reordering or
swapping chunks, and swapping whole files (``context`` names the snapshot and the file)
all fail authentication. Memory stays O(chunk_size) whatever the file size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import InvalidArgument, SnapshotTampered
from ..security.keys import SNAPSHOT_KEY_FILE, symmetric_key
from .seal_stream import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SealInfo,
    Tampered,
    fd_writer,
    seal_stream,
    unseal_stream,
)

Progress = Callable[[int, int], None]


def snapshot_key() -> bytes:
    """The host snapshot master key (32 bytes, created on first use, 0600)."""
    key = symmetric_key(SNAPSHOT_KEY_FILE)
    assert key is not None
    return key


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise InvalidArgument("key", "must be 32 bytes", allowed="a 256-bit AES key")


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgument("chunk_size", str(chunk_size), allowed=f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")


def _open_out(path: Path, *, exclusive: bool = False) -> BinaryIO:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb", buffering=0)


def seal_file(src: Path | str, dst: Path | str, key: bytes, *, context: bytes = b"",
              chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None,
              fsync: bool = True) -> SealInfo:
    """Encrypt ``src`` into ``dst`` (mode 0600) chunk by chunk; see the module doc.

    ``context`` binds the sealed file to its place (e.g. snapshot id + path): unsealing
    needs the same bytes. ``progress(done, total)`` is called after each chunk.
    """
    _check_key(key)
    _check_chunk_size(chunk_size)
    dst = Path(dst)
    total = os.stat(src).st_size
    try:
        with open(src, "rb", buffering=0) as fin, _open_out(dst) as fout:
            info = seal_stream(fin.readinto, fd_writer(fout.fileno()), key, context=context,
                               chunk_size=chunk_size, progress=progress, total=total)
            if fsync:
                os.fsync(fout.fileno())
    except ValueError as exc:  # more than 2**32 chunks
        dst.unlink(missing_ok=True)
        raise InvalidArgument("src", str(exc)) from None
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return info


def unseal_file(src: Path | str, dst: Path | str, key: bytes, *, context: bytes = b"",
                name: str | None = None, progress: Progress | None = None) -> int:
    """Decrypt ``src`` (from :func:`seal_file`) into ``dst`` (0600); returns the plain size.

    Any tampering raises :class:`SnapshotTampered` naming ``name`` (default: ``src``)
    and leaves no ``dst`` behind.
    """
    _check_key(key)
    label = name or str(src)
    dst = Path(dst)
    total = os.stat(src).st_size
    try:
        with open(src, "rb", buffering=0) as fin, _open_out(dst) as fout:
            return unseal_stream(fin.readinto, fd_writer(fout.fileno()), key, context=context,
                                 progress=progress, total=total)
    except Tampered as exc:
        dst.unlink(missing_ok=True)
        raise SnapshotTampered(f"sealed file {label!r}: {exc}", file=label) from None
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
