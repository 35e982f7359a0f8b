"""Streaming seal/unseal: the sealed-file format's core, and the helper process QEMU runs.

The format is the one :mod:`mvm.snapshots.seal` documents (``seal_file`` and
``unseal_file`` use the functions here, so a streamed blob and a sealed file are the
same bytes). This module imports only the standard library and ``cryptography``, so
it also runs as a small, fast-starting program (~30 ms) that QEMU starts for a
migration::

    python -P .../mvm/snapshots/seal_stream.py seal   CONTROL_SOCKET   # QMP migrate "exec:…"
    python -P .../mvm/snapshots/seal_stream.py unseal CONTROL_SOCKET   # -incoming "exec:…"

``seal`` reads the migration stream on stdin and writes the sealed blob; ``unseal``
writes the plain stream to stdout. The process QEMU starts forks and exits at once
(QEMU waits for it when it closes the stream); its child does the work. Neither gets
anything secret from its command line or its environment: it connects to ``CONTROL_SOCKET`` (a Unix socket in a private
0700 directory, served by ``sealing.SealSink`` / ``sealing.UnsealSource`` in the
supervisor, which only answers a peer of its own uid) and receives one frame::

    u32 BE length | JSON {"op", "key" (hex), "context" (hex), "chunk_size", "label",
                          "sealed_sha256" (unseal: the signed manifest's hash of the blob)}
    + one file descriptor (SCM_RIGHTS): the blob to write (seal: opened O_WRONLY in the
      store's staging directory) or the blob to read (unseal: the file descriptor the
      supervisor opened and checked — size, regular file — against the signed manifest)

and answers with one frame when it is done::

    {"ok": true, "size", "sealed_size", "sealed_sha256", "chunks"}
    {"ok": false, "error": "...", "tampered": true|false}

The unsealer authenticates every chunk before writing its plaintext and stops at the
first failure (its answer says ``tampered``; the worker exits 2), so a modified blob never
delivers its modified part and QEMU's load fails on the cut stream. It also hashes the
sealed bytes as they pass and writes the last chunk only if the whole blob's sha256 is the
signed manifest's, so QEMU's load cannot complete on any other blob (one read of the blob,
verified while QEMU loads it, instead of a hash pass before the stream). The supervisor
resumes the restored VM only after this answer said ``ok``.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"MVMSEAL1"
VERSION = 1
HEADER_SIZE = 40
TAG_SIZE = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 12
MAX_CHUNK_SIZE = 1 << 26
_MAX_FRAME = 1 << 16
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20

Progress = Callable[[int, int], None]
ReadInto = Callable[[memoryview], int]
Write = Callable[[bytes], None]


class Tampered(Exception):
    """The sealed bytes fail authentication (``str(exc)`` says how)."""


class SealInfo(NamedTuple):  # not a dataclass: the helper starts ~8 ms faster without it
    """What was sealed: plain and sealed sizes, sha256 of the sealed bytes."""

    size: int
    sealed_size: int
    sealed_sha256: str
    chunks: int


def file_aead(key: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"mvm-seal-v1").derive(bytes(key)))


def chunk_ad(header: bytes, index: int, final: bool, context: bytes) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00") + context


def _fill(read_into: ReadInto, buf: bytearray) -> int:
    """Read until ``buf`` is full or at EOF; returns how many bytes it holds."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = read_into(view[got:])
        if not n:
            break
        got += n
    return got


def seal_stream(read_into: ReadInto, write: Write, key: bytes, *, context: bytes = b"",
                chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None,
                total: int = 0) -> SealInfo:
    """Seal everything ``read_into`` yields (until EOF) through ``write``, chunk by
    chunk; O(chunk_size) memory. The sha256 of the sealed bytes is computed on a helper
    thread (hashlib drops the GIL) while the next chunk is read and encrypted."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    salt = os.urandom(16)
    prefix = os.urandom(8)
    header = MAGIC + bytes([VERSION, 0, 0, 0]) + struct.pack(">I", chunk_size) + salt + prefix
    assert len(header) == HEADER_SIZE
    aead = file_aead(key, salt)
    digest = hashlib.sha256(header)
    pending: queue.Queue[bytes | None] = queue.Queue(maxsize=2)

    def hash_chunks() -> None:
        while (item := pending.get()) is not None:
            digest.update(item)

    hasher = threading.Thread(target=hash_chunks, name="mvm-seal-sha256", daemon=True)
    hasher.start()
    done = index = 0
    sealed_size = HEADER_SIZE
    try:
        write(header)
        bufs = (bytearray(chunk_size), bytearray(chunk_size))
        have = _fill(read_into, bufs[0])
        while True:
            current = bufs[index % 2]
            following = _fill(read_into, bufs[(index + 1) % 2]) if have == chunk_size else 0
            final = not following
            if index >= 1 << 32:
                raise ValueError("the stream is too large to seal with this chunk size")
            nonce = prefix + index.to_bytes(4, "big")
            sealed = aead.encrypt(nonce, memoryview(current)[:have], chunk_ad(header, index, final, context))
            write(sealed)
            pending.put(sealed)
            sealed_size += len(sealed)
            done += have
            index += 1
            if progress is not None:
                progress(done, max(total, done))
            if final:
                break
            have = following
    finally:
        pending.put(None)
        hasher.join()
    return SealInfo(size=done, sealed_size=sealed_size, sealed_sha256=digest.hexdigest(), chunks=index)


def unseal_stream(read_into: ReadInto, write: Write, key: bytes, *, context: bytes = b"",
                  progress: Progress | None = None, total: int = 0, sealed_sha256: str | None = None) -> int:
    """Authenticate and decrypt a sealed stream through ``write``; returns the plain size.
    Each chunk is authenticated before its plaintext is written; the first failure
    raises :class:`Tampered` (nothing of that chunk or later is written).

    ``sealed_sha256`` (the signed manifest's hash of the whole sealed blob): the sealed
    bytes are hashed as they stream by, and the last chunk's plaintext is written only
    if the whole blob matched; otherwise :class:`Tampered` — so a reader never gets a
    complete stream from a blob other than the one the manifest lists."""
    raw = bytearray(HEADER_SIZE)
    if _fill(read_into, raw) != HEADER_SIZE or raw[:8] != MAGIC or raw[8] != VERSION:
        raise Tampered("not a sealed file (bad header)")
    header = bytes(raw)
    hasher = _Hasher(header) if sealed_sha256 is not None else None
    try:
        return _unseal_chunks(read_into, write, key, header, context, progress, total, hasher, sealed_sha256)
    finally:
        if hasher is not None:
            hasher.stop()


class _Hasher:
    """sha256 of a stream, computed on a thread (hashlib drops the GIL) while the caller
    goes on; at most two chunks queued."""

    def __init__(self, first: bytes):
        self._digest = hashlib.sha256(first)
        self._pending: queue.Queue[bytes | None] = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._run, name="mvm-unseal-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            self._digest.update(item)

    def feed(self, data: bytes) -> None:
        self._pending.put(data)

    def hexdigest(self) -> str:
        self.stop()
        return self._digest.hexdigest()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()


def _unseal_chunks(read_into: ReadInto, write: Write, key: bytes, header: bytes, context: bytes,
                   progress: Progress | None, total: int, hasher: _Hasher | None, sealed_sha256: str | None) -> int:
    (chunk_size,) = struct.unpack(">I", header[12:16])
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise Tampered("bad chunk size in header")
    aead = file_aead(key, header[16:32])
    prefix = header[32:40]
    block = chunk_size + TAG_SIZE
    bufs = (bytearray(block), bytearray(block))
    index = size = 0
    done = HEADER_SIZE
    have = _fill(read_into, bufs[0])
    while True:
        current = bufs[index % 2]
        following = _fill(read_into, bufs[(index + 1) % 2]) if have == block else 0
        final = not following
        if have < TAG_SIZE:
            raise Tampered(f"chunk {index} is truncated")
        nonce = prefix + index.to_bytes(4, "big")
        sealed = memoryview(current)[:have]
        if hasher is not None:
            hasher.feed(bytes(sealed))  # a copy: the next round refills this buffer
        try:
            plain = aead.decrypt(nonce, sealed, chunk_ad(header, index, final, context))
        except InvalidTag:
            why = ("modified, reordered, swapped or truncated" if index or not final
                   else "modified, swapped, truncated, or sealed with another key")
            raise Tampered(f"chunk {index} fails authentication ({why})") from None
        if final and hasher is not None and hasher.hexdigest() != sealed_sha256:
            raise Tampered("sha256 does not match the manifest (modified or swapped)")
        write(plain)
        size += len(plain)
        done += have
        index += 1
        if progress is not None:
            progress(done, max(total, done))
        if final:
            return size
        have = following


# ---- fd helpers --------------------------------------------------------------------


def fd_writer(fd: int) -> Write:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    return write


def fd_reader(fd: int) -> ReadInto:
    return lambda view: os.readv(fd, [view])


def fd_preader(fd: int, offset: int = 0) -> ReadInto:
    """Reads at its own offset (``pread``): a file description shared with another
    process keeps its offset untouched."""
    position = offset

    def read_into(view: memoryview) -> int:
        nonlocal position
        n = os.preadv(fd, [view], position)
        position += n
        return n

    return read_into


def grow_pipe(fd: int) -> None:
    """Fewer, larger pipe transfers between QEMU and us (best effort)."""
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


# ---- control frames ----------------------------------------------------------------


def send_frame(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(message).encode()
    frame = struct.pack(">I", len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [frame], list(fds))
        frame = frame[sent:]
    if frame:
        sock.sendall(frame)


def recv_frame(sock: socket.socket, want_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One frame (and the fds sent with it); ``EOFError`` if the peer closed first."""
    buf = b""
    fds: list[int] = []
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        if len(buf) >= 4 and struct.unpack(">I", buf[:4])[0] > _MAX_FRAME:
            raise ValueError("control frame too large")
        if want_fds and not fds:
            data, got, _flags, _addr = socket.recv_fds(sock, _MAX_FRAME, want_fds)
            fds.extend(got)
        else:
            data = sock.recv(_MAX_FRAME)
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError("the control peer closed the connection")
        buf += data
    (length,) = struct.unpack(">I", buf[:4])
    return json.loads(buf[4:4 + length]), fds


# ---- the helper process ------------------------------------------------------------


def _run(op: str, control: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(control)
    params, fds = recv_frame(sock, want_fds=1)
    if params.get("op") != op or len(fds) != 1:
        send_frame(sock, {"ok": False, "error": f"expected one {op!r} request with a file descriptor"})
        return 1
    (blob,) = fds
    key = bytes.fromhex(params.pop("key"))
    context = bytes.fromhex(params["context"])
    try:
        if op == "seal":
            grow_pipe(0)
            info = seal_stream(fd_reader(0), fd_writer(blob), key, context=context,
                               chunk_size=int(params["chunk_size"]))
            os.fsync(blob)
            reply = {"ok": True, "size": info.size, "sealed_size": info.sealed_size,
                     "sealed_sha256": info.sealed_sha256, "chunks": info.chunks}
        else:
            grow_pipe(1)
            expected = params.get("sealed_sha256")
            size = unseal_stream(fd_preader(blob), fd_writer(1), key, context=context,
                                 sealed_sha256=str(expected) if expected is not None else None)
            reply = {"ok": True, "size": size}
    except Tampered as exc:
        reply = {"ok": False, "tampered": True, "error": str(exc)}
    except Exception as exc:  # reported to the supervisor, which decides
        reply = {"ok": False, "tampered": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        os.close(blob)
        del key
    if not reply["ok"]:
        print(f"mvm seal_stream {op} ({params.get('label', '?')}): {reply['error']}", file=sys.stderr, flush=True)
    try:
        send_frame(sock, reply)
    except OSError:
        return 1
    return 0 if reply["ok"] else (2 if reply.get("tampered") else 1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("seal", "unseal"):
        print("usage: seal_stream.py seal|unseal CONTROL_SOCKET", file=sys.stderr)
        return 64
    # QEMU (7.2) waits for the process it started when it closes the migration stream: the
    # work goes on in a child, so QEMU's side ends when its last byte is written (the VM
    # resumes) while the sealer still encrypts and hashes its last chunks and fsyncs.
    if os.fork() != 0:
        os._exit(0)
    try:
        return _run(args[0], args[1])
    except (OSError, EOFError, ValueError) as exc:
        print(f"mvm seal_stream {args[0]}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
