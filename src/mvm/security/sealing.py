"""Sealed snapshots: streamed AES-256-GCM files, a signed manifest, and the snapshot store.

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

Snapshot directory (``SnapshotStore``; dirs 0700, files 0600)::

    $MVM_HOME/snapshots/
      .lock                         flock for create/remove/prune (shared while restoring)
      snap_<16 hex>/
        manifest.json               signed (host Ed25519 key, domain "mvm-snapshot-v1")
        blobs/000000.sealed ...     one sealed file per snapshotted file

The manifest lists, per file, its relative path, plain size, sealed size and the sha256
of the sealed bytes, plus name, sandbox_id, kind, created_at, expires_at, keep and
details. :func:`verify_snapshot` checks the signature and every blob's size and hash
before a single byte is unsealed; anything wrong raises :class:`SnapshotTampered`
naming the file. The master key is ``$MVM_HOME/keys/snapshot.key`` (0600).

Streams (a VM's memory image, which must never be a plain file): :meth:`SnapshotStore.begin`
gives a :class:`PendingSnapshot` whose :meth:`~PendingSnapshot.stream` sink is a shell
command (QEMU's ``exec:`` migration) sealing its stdin straight into the snapshot; and
:meth:`SnapshotStore.restoring` verifies everything, then streams such a file back
through an unsealer command (``-incoming exec:``) reading the very descriptor that was
hashed. The helper process is :mod:`.seal_stream`; its key comes over a private control
socket, never a command line or an environment.
"""

from __future__ import annotations

import builtins
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mvm import paths
from mvm.durations import DURATION_HELP, parse_duration
from mvm.errors import InvalidArgument, SandboxError, SnapshotNotFound, SnapshotTampered

from . import seal_stream as _seal_stream_module
from ..osutil import ensure_private_dir, fsync_dir, make_dirs, write_private_atomic
from .canonical import canonical_json, format_ts, parse_ts
from .seal_stream import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    TAG_SIZE,
    VERSION,
    SealInfo,
    Tampered,
    fd_writer,
    recv_frame,
    seal_stream,
    send_frame,
    unseal_stream,
)
from .keys import (
    SNAPSHOT_KEY_FILE,
    PublicKeyLike,
    host_signing_key,
    key_id,
    load_public_key,
    sign,
    symmetric_key,
    verify_signature,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_EXPIRES",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "SEAL_STREAM_SCRIPT",
    "TAG_SIZE",
    "VERSION",
    "OpenedSnapshot",
    "PendingSnapshot",
    "SealInfo",
    "SealSink",
    "SealedFile",
    "SealedSnapshot",
    "SnapshotInfo",
    "SnapshotStore",
    "UnsealSource",
    "seal_file",
    "snapshot_key",
    "unseal_file",
    "verify_snapshot",
]

#: Retention when ``create(expires=None)``; ``MVM_SNAPSHOT_EXPIRES`` overrides it.
DEFAULT_EXPIRES = "7d"
SIG_DOMAIN = b"mvm-snapshot-v1"
MANIFEST = "manifest.json"
BLOBS = "blobs"
_ID_RE = re.compile(r"snap_[0-9a-f]{16}")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_NEVER = ("never", "none", "forever")

Progress = Callable[[int, int], None]


# ---- streaming AEAD -----------------------------------------------------------------


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


# ---- manifest ---------------------------------------------------------------------


@dataclass(frozen=True)
class SealedFile:
    path: str  # relative path of the original file
    blob: str  # relative path of the sealed blob in the snapshot directory
    size: int
    sealed_size: int
    sealed_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "blob": self.blob, "size": self.size, "sealed_size": self.sealed_size,
                "sealed_sha256": self.sealed_sha256}


@dataclass(frozen=True)
class SealedSnapshot:
    """The signed manifest of a sealed snapshot."""

    id: str
    name: str
    sandbox_id: str
    kind: str
    created_at: str
    expires_at: str | None
    keep: bool
    chunk_size: int
    key_check: str
    files: tuple[SealedFile, ...]
    details: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"v": 1, "type": "mvm.snapshot", "id": self.id, "name": self.name, "sandbox_id": self.sandbox_id,
                "kind": self.kind, "created_at": self.created_at, "expires_at": self.expires_at,
                "keep": self.keep, "chunk_size": self.chunk_size, "key_check": self.key_check,
                "files": [f.to_dict() for f in self.files], "details": self.details}

    def signed(self, signer: Ed25519PrivateKey) -> bytes:
        body = self.body()
        body["signature"] = {"alg": "ed25519", "key_id": key_id(signer),
                             "sig": sign(signer, SIG_DOMAIN, canonical_json(body, field="details"))}
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SealedSnapshot:
        return cls(id=body["id"], name=body["name"], sandbox_id=body["sandbox_id"], kind=body["kind"],
                   created_at=body["created_at"], expires_at=body["expires_at"], keep=bool(body["keep"]),
                   chunk_size=int(body["chunk_size"]), key_check=body["key_check"],
                   files=tuple(SealedFile(**f) for f in body["files"]), details=dict(body.get("details") or {}))

    def context(self, rel: str) -> bytes:
        return _context(self.id, rel)


def _context(snapshot_id: str, rel: str) -> bytes:
    """What binds a sealed file to its snapshot and path (the AEAD's associated data)."""
    return b"mvm-snapshot-v1\0" + snapshot_id.encode() + b"\0" + rel.encode("utf-8")


def _key_check(key: bytes) -> str:
    return hashlib.sha256(b"mvm-snapshot-key-check\0" + bytes(key)).hexdigest()[:16]


def _safe_rel(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        return False
    pure = PurePosixPath(rel)
    return not pure.is_absolute() and all(p not in ("", ".", "..") for p in rel.split("/"))


def _read_manifest(directory: Path, public_key: PublicKeyLike = None) -> SealedSnapshot:
    snap = directory.name

    def tampered(problem: str, file: str = MANIFEST) -> SnapshotTampered:
        return SnapshotTampered(f"snapshot {snap}: {file}: {problem}", file=file, path=None, snapshot=snap)

    path = directory / MANIFEST
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise tampered("is not a regular file")
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise tampered("is missing") from None
    except (OSError, ValueError) as exc:
        raise tampered(f"is unreadable ({exc})") from None
    if not isinstance(raw, dict) or raw.get("type") != "mvm.snapshot" or raw.get("v") != 1:
        raise tampered("is not an mvm snapshot manifest")
    signature = raw.pop("signature", None)
    if not isinstance(signature, dict) or signature.get("alg") != "ed25519":
        raise tampered("has no ed25519 signature")
    public = load_public_key(public_key)
    if signature.get("key_id") != key_id(public):
        raise tampered(f"signed by key {signature.get('key_id')}, not by this host's key {key_id(public)}")
    try:
        body_bytes = canonical_json(raw)
    except InvalidArgument:
        raise tampered("cannot be canonicalised (modified)") from None
    if not verify_signature(public, SIG_DOMAIN, body_bytes, str(signature.get("sig", ""))):
        raise tampered("signature does not verify (manifest modified)")
    try:
        manifest = SealedSnapshot.from_body(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise tampered(f"is malformed ({exc})") from None
    if manifest.id != snap:
        raise tampered(f"belongs to snapshot {manifest.id}, not {snap} (directories swapped or renamed)")
    for f in manifest.files:
        if not _safe_rel(f.path) or not _safe_rel(f.blob):
            raise tampered(f"has an unsafe path {f.path!r} / {f.blob!r}")
    return manifest


def verify_snapshot(directory: Path | str, public_key: PublicKeyLike = None, *,
                    key: bytes | None = None) -> SealedSnapshot:
    """Check a snapshot directory before anything is unsealed: the manifest's signature
    (default: host key), that it is this directory's, that every listed blob exists with
    the listed size and sha256, that nothing else is there, and (if ``key`` is given)
    that it was sealed with that key. Returns the manifest; raises
    :class:`SnapshotTampered` naming the first bad file.
    """
    manifest, _, _ = _verify(Path(directory), public_key, key, keep_open=())
    return manifest


class _BlobHash:
    """The sha256 check of one blob, run on a thread (hashlib drops the GIL) while the
    caller goes on (e.g. QEMU starts): :meth:`wait`, then :attr:`error` is None if the
    blob's sha256 is the manifest's. Reads with ``pread`` (the fd's offset is left alone)."""

    def __init__(self, fd: int, sha256: str, tampered: Callable[[], SnapshotTampered], label: str):
        self._fd = fd
        self._sha256 = sha256
        self._tampered = tampered
        self._label = label
        self.error: SandboxError | SnapshotTampered | None = None
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mvm-verify-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            digest = hashlib.sha256()
            buf = memoryview(bytearray(1 << 20))
            offset = 0
            while n := os.preadv(self._fd, [buf], offset):
                if self._cancel.is_set():
                    self.error = SandboxError(f"verifying {self._label} was cancelled")
                    return
                digest.update(buf[:n])
                offset += n
            if digest.hexdigest() != self._sha256:
                self.error = self._tampered()
        except OSError as exc:
            self.error = SandboxError(f"verifying {self._label} failed: {exc}")
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the check is done (see :attr:`error`)."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join()


def _verify(directory: Path, public_key: PublicKeyLike, key: bytes | None, keep_open: Iterable[str],
            background: Iterable[str] = ()) -> tuple[SealedSnapshot, dict[str, int], dict[str, _BlobHash]]:
    """:func:`verify_snapshot`, also returning open read-only fds of the blobs of the
    files named in ``keep_open``: the very files that were hashed, for a reader that
    must not reopen them by name (the caller closes them). The sha256 of those also
    named in ``background`` is checked on a thread, started before anything else is
    checked: the caller must wait for its :class:`_BlobHash` (returned) before using
    the blob, and cancel it before closing the fd. Everything else is checked here."""
    manifest = _read_manifest(directory, public_key)
    snap = manifest.id
    wanted = set(keep_open)
    deferred = wanted & set(background)

    def tampered(file: str, problem: str, original: str | None = None) -> SnapshotTampered:
        label = f"{file} ({original})" if original else file
        return SnapshotTampered(f"snapshot {snap}: {label}: {problem}", file=file, path=original, snapshot=snap)

    if key is not None and _key_check(key) != manifest.key_check:
        raise tampered(MANIFEST, "was sealed with a different snapshot key")
    expected = {f.blob for f in manifest.files}
    kept: dict[str, int] = {}
    checks: dict[str, _BlobHash] = {}
    try:
        for f in sorted(manifest.files, key=lambda f: f.path not in deferred):  # the background ones first
            blob = directory / f.blob
            try:
                st = os.lstat(blob)
            except FileNotFoundError:
                raise tampered(f.blob, "is missing", f.path) from None
            if not stat.S_ISREG(st.st_mode):
                raise tampered(f.blob, "is not a regular file", f.path)
            try:
                fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise tampered(f.blob, f"cannot be opened ({exc.strerror})", f.path) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise tampered(f.blob, "is not a regular file", f.path)
                if st.st_size != f.sealed_size:
                    raise tampered(f.blob, f"is {st.st_size} bytes, the manifest says {f.sealed_size} "
                                           "(truncated or extended)", f.path)
                mismatch = functools.partial(tampered, f.blob, "sha256 does not match the manifest (modified or "
                                             "swapped)", f.path)
                if f.path in deferred:
                    checks[f.path] = _BlobHash(fd, f.sealed_sha256, mismatch, f"{f.blob} ({f.path})")
                else:
                    with open(fd, "rb", closefd=False) as fh:
                        actual = hashlib.file_digest(fh, "sha256").hexdigest()
                    if actual != f.sealed_sha256:
                        raise mismatch()
            except BaseException:
                os.close(fd)
                raise
            if f.path in wanted:
                kept[f.path] = fd
            else:
                os.close(fd)
        for root, dirs, files in os.walk(directory):
            for entry in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                rel = os.path.relpath(os.path.join(root, entry), directory)
                if rel != MANIFEST and rel not in expected:
                    raise tampered(rel, "is not part of the snapshot (added)")
    except BaseException:
        for check in checks.values():
            check.cancel()
        for fd in kept.values():
            os.close(fd)
        raise
    return manifest, kept, checks


# ---- store ------------------------------------------------------------------------


def _ts_float(text: str | None) -> float | None:
    return None if text is None else parse_ts(text).timestamp()


@dataclass(frozen=True)
class SnapshotInfo:
    """One stored snapshot as ``list``/``get`` see it. Times are epoch seconds
    (``expires_at`` ``None``: never expires); ``size_bytes`` is what it takes on disk."""

    id: str
    name: str
    sandbox_id: str
    kind: str
    created_at: float
    expires_at: float | None
    size_bytes: int
    plain_bytes: int
    keep: bool
    files: tuple[str, ...]
    details: dict[str, Any]
    path: Path

    def age_seconds(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.created_at

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at

    def to_wire(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-able dict (the SDK's ``Snapshot`` fields plus ``plain_bytes``,
        ``files``, ``details``, ``age_seconds``)."""
        return {"id": self.id, "name": self.name, "sandbox_id": self.sandbox_id, "kind": self.kind,
                "created_at": self.created_at, "expires_at": self.expires_at, "size_bytes": self.size_bytes,
                "plain_bytes": self.plain_bytes, "keep": self.keep, "files": list(self.files),
                "details": dict(self.details), "age_seconds": round(self.age_seconds(now), 3)}

    to_dict = to_wire

    @classmethod
    def from_manifest(cls, manifest: SealedSnapshot, path: Path) -> SnapshotInfo:
        return cls(id=manifest.id, name=manifest.name, sandbox_id=manifest.sandbox_id, kind=manifest.kind,
                   created_at=_ts_float(manifest.created_at) or 0.0, expires_at=_ts_float(manifest.expires_at),
                   size_bytes=sum(f.sealed_size for f in manifest.files) + _file_size(path / MANIFEST),
                   plain_bytes=sum(f.size for f in manifest.files), keep=manifest.keep,
                   files=tuple(f.path for f in manifest.files), details=dict(manifest.details), path=path)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _default_expires() -> str:
    return os.environ.get("MVM_SNAPSHOT_EXPIRES") or DEFAULT_EXPIRES


# ---- streamed blobs ---------------------------------------------------------------

#: The helper process QEMU starts for a streamed (un)seal (see :mod:`.seal_stream`).
SEAL_STREAM_SCRIPT = Path(_seal_stream_module.__file__).resolve()
_WAIT_TIMEOUT = 120.0


def _python() -> str:
    return sys.executable or "python3"


def _socket_parent() -> str:
    # A short parent: a Unix socket path must fit in 108 bytes, $MVM_HOME may be deep.
    return "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK | os.X_OK) else tempfile.gettempdir()


class _StreamHelper:
    """Serves one ``seal_stream.py`` helper process on a private control socket.

    :meth:`command` is the shell command to run it (what QEMU gets after ``exec:``):
    only paths, nothing secret. The control socket lives in a fresh 0700 directory and
    only a peer of our own uid is answered; it receives the key, the AEAD context and
    one file descriptor (see :mod:`.seal_stream`), and its answer is what
    :meth:`_wait` returns. :meth:`close` (idempotent) ends everything and removes the
    directory; a helper still running then fails on its own (its peer is gone).
    """

    op = ""
    verb = ""

    def __init__(self, params: dict[str, Any], fd: int, label: str, *, connect_timeout: float = _WAIT_TIMEOUT):
        self._params = params
        self._fd: int | None = fd
        self.label = label
        self._connect_timeout = connect_timeout
        self._dir: Path | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._reply: dict[str, Any] | None = None
        self._error = ""
        self._done = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.helper_pid: int | None = None

    def command(self) -> str:
        """``exec python -P …/seal_stream.py seal|unseal CONTROL_SOCKET`` (for ``sh -c``)."""
        with self._lock:
            if self._closing.is_set() or self._fd is None:
                raise InvalidArgument("stream", f"the {self.op} stream of {self.label} is already closed")
            if self._listener is None:
                self._listen()
        assert self._dir is not None
        return " ".join(["exec", shlex.quote(_python()), "-P", shlex.quote(str(SEAL_STREAM_SCRIPT)), self.op,
                         shlex.quote(str(self._dir / "ctl"))])

    def _listen(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="mvm-seal-", dir=_socket_parent()))  # 0700
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self._dir / "ctl"))
            listener.listen(4)
            listener.settimeout(0.1)
        except BaseException:
            listener.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name=f"mvm-{self.op}-stream", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._listener is not None and self._fd is not None
        deadline = time.monotonic() + self._connect_timeout
        try:
            while True:
                if self._closing.is_set():
                    return
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    if time.monotonic() > deadline:
                        self._error = f"the helper process did not connect within {self._connect_timeout:.0f} s"
                        return
                    continue
                pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                     struct.calcsize("3i")))
                if uid != os.geteuid():
                    conn.close()
                    continue
                break
            self.helper_pid = pid
            self._listener.close()
            self._conn = conn
            conn.settimeout(None)
            if not self._release():  # the helper gets nothing, so its reader gets no byte
                conn.shutdown(socket.SHUT_RDWR)
                return
            send_frame(conn, {**self._params, "op": self.op, "label": self.label}, [self._fd])
            self._reply, _ = recv_frame(conn)  # when the helper is done (close() unblocks it)
        except (OSError, EOFError, ValueError) as exc:
            if not self._closing.is_set():
                self._error = f"the helper process ended without an answer ({exc})"
        finally:
            self._done.set()

    def _release(self) -> bool:
        """Whether the connected helper may have the key and the fd (it has none before)."""
        return True

    def _wait(self, timeout: float) -> dict[str, Any]:
        if self._thread is None:
            raise InvalidArgument("stream", f"the {self.op} stream of {self.label} was never started (command())")
        if not self._done.wait(timeout):
            raise SandboxError(f"{self.verb} {self.label}: no answer from the helper process within {timeout:.0f} s")
        if self._reply is None:
            raise SandboxError(f"{self.verb} {self.label} failed: {self._error or 'the helper process exited'}")
        return self._reply

    def close(self) -> None:
        with self._lock:
            self._closing.set()
            conn, listener, thread = self._conn, self._listener, self._thread
        for sock in (conn, listener):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if thread is not None:
            thread.join(5)
        for sock in (conn, listener):
            if sock is not None:
                sock.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> _StreamHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SealSink(_StreamHelper):
    """Where a backend streams a file it does not write itself (the VM's memory image):
    ``command()`` reads the stream on stdin and seals it straight into the pending
    snapshot's blob, so its plaintext never touches a disk. Made by
    :meth:`PendingSnapshot.stream`."""

    op = "seal"
    verb = "sealing"

    def __init__(self, blob_path: Path, blob: str, rel: str, key: bytes, context: bytes, chunk_size: int):
        fd = os.open(blob_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        super().__init__({"key": bytes(key).hex(), "context": context.hex(), "chunk_size": chunk_size}, fd, rel)
        self.rel = rel
        self.blob = blob
        self.info: SealInfo | None = None

    def finish(self, timeout: float = _WAIT_TIMEOUT) -> int:
        """Wait until the whole stream is sealed and on disk; returns its plain size.
        :class:`SandboxError` if the sealer failed or died (then nothing is adopted)."""
        if self.info is None:
            reply = self._wait(timeout)
            if not reply.get("ok"):
                raise SandboxError(f"sealing {self.rel} failed: {reply.get('error')}")
            info = SealInfo(size=int(reply["size"]), sealed_size=int(reply["sealed_size"]),
                            sealed_sha256=str(reply["sealed_sha256"]), chunks=int(reply["chunks"]))
            assert self._fd is not None
            actual = os.fstat(self._fd).st_size
            if actual != info.sealed_size:
                raise SandboxError(f"sealing {self.rel}: the blob is {actual} bytes, the sealer wrote "
                                   f"{info.sealed_size}")
            self.info = info
            self.close()
        return self.info.size


class UnsealSource(_StreamHelper):
    """A verified blob streamed back as plaintext: ``command()`` writes it to stdout
    (QEMU's ``-incoming exec:``), authenticating each chunk first. :meth:`finish` says
    whether all of it was delivered intact. Made by :meth:`SnapshotStore.restoring`.

    With ``restoring(..., verify_in_background=True)`` the blob's sha256 is still being
    checked when ``command()`` can already run: its helper then gets the key and the fd
    only once the whole blob matched the signed manifest (until then it has nothing to
    write); on a mismatch it gets neither — it exits without writing a byte, so its
    reader sees an empty stream — and :meth:`verify` / :meth:`finish` raise
    :class:`SnapshotTampered`."""

    op = "unseal"
    verb = "unsealing"

    def __init__(self, fd: int, key: bytes, manifest: SealedSnapshot, sealed: SealedFile,
                 check: _BlobHash | None = None):
        super().__init__({"key": bytes(key).hex(), "context": manifest.context(sealed.path).hex()}, fd,
                         f"{sealed.blob} ({sealed.path})")
        self.snapshot = manifest.id
        self.file = sealed
        self._check = check
        self.released = False  # whether a helper was given the key and the fd

    def _release(self) -> bool:
        check = self._check
        if check is not None:
            while not check.wait(0.05):
                if self._closing.is_set():
                    return False
            if check.error is not None:
                self._error = check.error.message
                return False
        self.released = not self._closing.is_set()
        return self.released

    def verify(self, timeout: float = _WAIT_TIMEOUT) -> None:
        """Block until the blob's sha256 was checked against the signed manifest (at
        once unless it runs in the background): :class:`SnapshotTampered` if it does not
        match."""
        check = self._check
        if check is None:
            return
        if not check.wait(timeout):
            raise SandboxError(f"verifying {self.label}: not done within {timeout:.0f} s")
        if check.error is not None:
            raise check.error

    def finish(self, timeout: float = _WAIT_TIMEOUT) -> None:
        """Wait for the unsealer's verdict: :class:`SnapshotTampered` if the blob's
        sha256 or a chunk failed authentication (or the size is not the manifest's),
        :class:`SandboxError` if it failed otherwise (e.g. its reader went away)."""
        self.verify(timeout)
        reply = self._wait(timeout)
        f = self.file
        if not reply.get("ok"):
            if reply.get("tampered"):
                raise SnapshotTampered(f"snapshot {self.snapshot}: {f.blob} ({f.path}): {reply.get('error')}",
                                       file=f.blob, path=f.path, snapshot=self.snapshot)
            raise SandboxError(f"unsealing {f.path} of snapshot {self.snapshot} failed: {reply.get('error')}")
        if int(reply.get("size", -1)) != f.size:
            raise SnapshotTampered(f"snapshot {self.snapshot}: {f.blob} ({f.path}): unsealed to "
                                   f"{reply.get('size')} bytes, the manifest says {f.size}", file=f.blob,
                                   path=f.path, snapshot=self.snapshot)
        self.close()

    def close(self) -> None:
        if self._check is not None:
            self._check.cancel()  # its thread reads the fd closed below
        super().close()


class SnapshotStore:
    """Sealed snapshots under ``paths.snapshots_dir()`` (or ``root``).

    ``chunk_size``, ``signer`` (Ed25519, default the host key) and ``key`` (32 bytes,
    default ``keys/snapshot.key``) are for tests and benchmarks.
    """

    def __init__(self, root: Path | str | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 signer: Ed25519PrivateKey | None = None, key: bytes | None = None):
        self._root = Path(root) if root is not None else None
        self.chunk_size = chunk_size
        self._signer = signer
        self._key = key

    @property
    def root(self) -> Path:
        return ensure_private_dir(self._root if self._root is not None else paths.snapshots_dir())

    @property
    def signer(self) -> Ed25519PrivateKey:
        return self._signer if self._signer is not None else host_signing_key()

    @property
    def key(self) -> bytes:
        return self._key if self._key is not None else snapshot_key()

    @contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- reading --

    def _ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if _ID_RE.fullmatch(p.name) and p.is_dir())

    def _manifests(self) -> list[SnapshotInfo]:
        out = []
        public = self.signer.public_key()
        for sid in self._ids():
            try:
                out.append(SnapshotInfo.from_manifest(_read_manifest(self.root / sid, public), self.root / sid))
            except SnapshotTampered:
                continue
        return out

    def list(self, *, sandbox_id: str | None = None) -> list[SnapshotInfo]:
        """Every snapshot whose manifest verifies (oldest first), optionally one sandbox's.
        See :meth:`problems` for those that do not."""
        infos = [i for i in self._manifests() if sandbox_id is None or i.sandbox_id == sandbox_id]
        return sorted(infos, key=lambda i: (i.created_at, i.id))

    def problems(self) -> dict[str, str]:
        """``{snapshot id: why its manifest is refused}`` for snapshots ``list`` leaves out."""
        out = {}
        public = self.signer.public_key()
        for sid in self._ids():
            try:
                _read_manifest(self.root / sid, public)
            except SnapshotTampered as exc:
                out[sid] = exc.message
        return out

    def get(self, id_or_name: str, *, sandbox_id: str | None = None) -> SnapshotInfo:
        """By id (``snap_…``) or by name (optionally within one sandbox). A name used by
        several sandboxes' snapshots must be qualified (``sandbox_id``) or given as an id.
        :class:`SnapshotNotFound`; :class:`SnapshotTampered` if its manifest is bad."""
        if not isinstance(id_or_name, str) or not id_or_name:
            raise InvalidArgument("snapshot", f"{id_or_name!r}", allowed="a snapshot id (snap_…) or name")
        if _ID_RE.fullmatch(id_or_name):
            directory = self.root / id_or_name
            if not directory.is_dir():
                raise SnapshotNotFound(f"no snapshot {id_or_name}", snapshot=id_or_name)
            return SnapshotInfo.from_manifest(_read_manifest(directory, self.signer.public_key()), directory)
        matches = [i for i in self.list(sandbox_id=sandbox_id) if i.name == id_or_name]
        if not matches:
            raise SnapshotNotFound(f"no snapshot named {id_or_name!r}", snapshot=id_or_name)
        if len(matches) > 1:
            raise InvalidArgument("snapshot", f"name {id_or_name!r} is used by several snapshots",
                                  allowed=", ".join(f"{i.id} (sandbox {i.sandbox_id})" for i in matches))
        return matches[0]

    def verify(self, id_or_name: str) -> SnapshotInfo:
        """Full check (signature, every blob, the key) without unsealing."""
        info = self.get(id_or_name)
        verify_snapshot(info.path, self.signer.public_key(), key=self.key)
        return info

    # -- writing --

    def _expiry(self, expires: Any, now: datetime) -> str | None:
        if expires is None:
            expires = _default_expires()
        if isinstance(expires, str) and expires.strip().lower() in _NEVER:
            return None
        seconds = parse_duration(expires, "expires")
        return format_ts(now + timedelta(seconds=seconds))

    def _check_name(self, name: Any, sandbox_id: Any) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.startswith("snap_"):
            raise InvalidArgument("name", f"{name!r} is not a valid snapshot name",
                                  allowed="1-128 characters from A-Z a-z 0-9 _ . - (not starting with . - or snap_)")
        if not isinstance(sandbox_id, str) or not _NAME_RE.fullmatch(sandbox_id):
            raise InvalidArgument("sandbox_id", f"{sandbox_id!r}", allowed="1-128 characters from A-Z a-z 0-9 _ . -")

    @staticmethod
    def _check_kind(kind: Any) -> None:
        if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
            raise InvalidArgument("kind", f"{kind!r}", allowed="'full', 'filesystem' (lowercase word, max 32)")

    def _name_taken_error(self, name: str, sandbox_id: str) -> InvalidArgument:
        return InvalidArgument("name", f"sandbox {sandbox_id} already has a snapshot named {name!r}",
                               allowed="a new name, or remove the old snapshot first")

    def begin(self, name: str, sandbox_id: str, expires: Any = None, keep: bool = False, *,
              now: datetime | float | None = None) -> PendingSnapshot:
        """Start a snapshot whose files arrive in two ways: streamed into sealed blobs
        (:meth:`PendingSnapshot.stream`, e.g. a VM's memory image straight from QEMU)
        and sealed from a directory at :meth:`PendingSnapshot.commit`. Use it as a
        context manager: leaving without ``commit`` discards everything (no half
        snapshot is ever listed). Arguments as :meth:`create`."""
        self._check_name(name, sandbox_id)
        when = (now if isinstance(now, datetime) else
                datetime.fromtimestamp(now, UTC) if now is not None else datetime.now(UTC))
        try:
            expires_at = self._expiry(expires, when)
        except InvalidArgument as exc:
            raise InvalidArgument("expires", exc.message.split(": ", 1)[-1],
                                  allowed=f'{DURATION_HELP}, or "never"') from None
        if self._name_taken(name, sandbox_id):
            raise self._name_taken_error(name, sandbox_id)
        snap_id = "snap_" + secrets.token_hex(8)
        staging = self.root / f".staging-{snap_id}-{os.getpid()}"
        try:
            ensure_private_dir(staging)
            ensure_private_dir(staging / BLOBS)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return PendingSnapshot(self, snap_id, name, sandbox_id, when, expires_at, bool(keep), staging)

    def create(self, name: str, sandbox_id: str, kind: str, files_dir: Path | str, expires: Any = None,
               keep: bool = False, *, files: Iterable[str] | None = None, details: Mapping[str, Any] | None = None,
               progress: Progress | None = None, now: datetime | float | None = None) -> SnapshotInfo:
        """Seal ``files_dir`` (every regular file under it, or just ``files``, relative
        names) into a new snapshot and return it.

        ``expires``: a duration (``"24h"``, seconds, timedelta), ``"never"``, or ``None``
        for the default (``$MVM_SNAPSHOT_EXPIRES`` or 7d). ``keep=True`` spares it from
        :meth:`remove_for_sandbox` (destroy); expiry still applies. ``details``: small
        JSON metadata (e.g. the backend's), signed with the rest. Nothing is left behind
        on error.
        """
        self._check_name(name, sandbox_id)
        self._check_kind(kind)
        canonical_json(dict(details or {}), field="details")
        self._collect(Path(files_dir), files)
        with self.begin(name, sandbox_id, expires, keep, now=now) as pending:
            return pending.commit(kind, files_dir, files=files, details=details, progress=progress)

    def _name_taken(self, name: str, sandbox_id: str) -> bool:
        return any(i.name == name and i.sandbox_id == sandbox_id for i in self._manifests())

    @staticmethod
    def _collect(source: Path, files: Iterable[str] | None) -> builtins.list[str]:
        if not source.is_dir():
            raise InvalidArgument("files_dir", f"{source} is not a directory")
        rels: list[str] = []
        if files is not None:
            for rel in files:
                if not _safe_rel(rel):
                    raise InvalidArgument("files", f"{rel!r} is not a relative path inside files_dir")
                rels.append(rel)
        else:
            for root, dirs, names in os.walk(source):
                dirs.sort()
                for entry in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                    rels.append(os.path.relpath(os.path.join(root, entry), source).replace(os.sep, "/"))
            rels.sort()
        for rel in rels:
            try:
                st = os.lstat(source / rel)
            except FileNotFoundError:
                raise InvalidArgument("files", f"{rel!r} does not exist in {source}") from None
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument("files_dir", f"{rel!r} is not a regular file (symlinks and special files "
                                      "cannot be snapshotted; archive them first)")
        if len(set(rels)) != len(rels):
            raise InvalidArgument("files", "lists a file twice")
        return rels

    def open_for_restore(self, id_or_name: str, *, dest_parent: Path | str | None = None,
                         progress: Progress | None = None, now: float | None = None) -> Path:
        """Verify the whole snapshot, then unseal it into a new private directory and
        return it (files 0600 at their original relative paths, dirs 0700). The caller
        removes it (``shutil.rmtree``). It is created under ``dest_parent`` (default: the
        snapshots directory, i.e. disk, not a RAM-backed /tmp).

        :class:`SnapshotTampered` (naming the file) if anything is off — then nothing is
        left behind; :class:`SnapshotNotFound` if it does not exist or has expired.
        """
        return self._open(id_or_name, (), dest_parent, progress, now).path

    @contextmanager
    def restoring(self, id_or_name: str, *, stream: Iterable[str] = (), dest_parent: Path | str | None = None,
                  progress: Progress | None = None, now: float | None = None,
                  verify_in_background: bool = False) -> Iterator[OpenedSnapshot]:
        """Like :meth:`open_for_restore`, but the files named in ``stream`` (those the
        snapshot has) are not unsealed to disk: ``opened.source(rel)`` streams each as
        plaintext to its reader (QEMU's ``-incoming exec:``). Everything, streamed files
        included, is verified first (signature, every blob's size and sha256); a
        streamed file is then read through the very file descriptor that was hashed, and
        its unsealer still authenticates every chunk. The unsealed directory and every
        source are removed/closed when the block ends.

        ``verify_in_background=True``: the sha256 of the streamed blobs is checked on a
        thread instead, so their reader can start meanwhile (QEMU starts while a memory
        image is hashed); everything else is verified before this returns as above. A
        source's unsealer gets the key and the blob only after its whole sha256 matched,
        so not one byte reaches its reader before; on a mismatch the reader gets an
        empty stream and ``source.verify()`` / ``source.finish()`` raise
        :class:`SnapshotTampered`."""
        opened = self._open(id_or_name, tuple(stream), dest_parent, progress, now, verify_in_background)
        try:
            yield opened
        finally:
            opened.close()

    def _open(self, id_or_name: str, stream: tuple[str, ...], dest_parent: Path | str | None,
              progress: Progress | None, now: float | None, background: bool = False) -> OpenedSnapshot:
        with self._locked(shared=True):
            info = self.get(id_or_name)
            if info.expired(now):
                raise SnapshotNotFound(f"snapshot {info.id} ({info.name}) expired at "
                                       f"{format_ts(info.expires_at or 0)}", snapshot=info.id)
            key = self.key
            manifest, fds, checks = _verify(info.path, self.signer.public_key(), key, keep_open=stream,
                                            background=stream if background else ())
            parent = make_dirs(Path(dest_parent)) if dest_parent is not None else self.root
            sources: dict[str, UnsealSource] = {}
            out: Path | None = None
            try:
                out = Path(tempfile.mkdtemp(prefix=f".restore-{info.id}-{os.getpid()}-", dir=parent))
                os.chmod(out, 0o700)
                for f in manifest.files:
                    if f.path in fds:
                        sources[f.path] = UnsealSource(fds.pop(f.path), key, manifest, f, checks.pop(f.path, None))
                plain = [f for f in manifest.files if f.path not in sources]
                total = sum(f.sealed_size for f in plain)
                done_before = 0
                for f in plain:
                    target = out / f.path
                    ensure_private_dir(target.parent)
                    base = done_before

                    def step(done: int, _total: int, base: int = base) -> None:
                        if progress is not None:
                            progress(base + done, total)

                    try:
                        size = unseal_file(info.path / f.blob, target, key, context=manifest.context(f.path),
                                           name=f"{f.blob} ({f.path})", progress=step)
                    except SnapshotTampered as exc:
                        raise SnapshotTampered(f"snapshot {info.id}: {exc.message}", file=f.blob, path=f.path,
                                               snapshot=info.id) from None
                    if size != f.size:
                        raise SnapshotTampered(f"snapshot {info.id}: {f.blob} ({f.path}): unsealed to {size} "
                                               f"bytes, the manifest says {f.size}", file=f.blob, path=f.path,
                                               snapshot=info.id)
                    done_before += f.sealed_size
            except BaseException:
                for check in checks.values():
                    check.cancel()
                for fd in fds.values():
                    os.close(fd)
                for source in sources.values():
                    source.close()
                if out is not None:
                    shutil.rmtree(out, ignore_errors=True)
                raise
        return OpenedSnapshot(info, manifest, out, sources)

    def _delete_dir(self, directory: Path) -> None:
        trash = self.root / f".trash-{directory.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(directory, trash)
        shutil.rmtree(trash)

    def remove(self, id_or_name: str) -> str:
        """Delete a snapshot: every file and directory of it, not just a listing entry.
        Works on a tampered snapshot too when given its id. Returns the id."""
        with self._locked():
            if isinstance(id_or_name, str) and _ID_RE.fullmatch(id_or_name):
                directory = self.root / id_or_name
                if not directory.is_dir():
                    raise SnapshotNotFound(f"no snapshot {id_or_name}", snapshot=id_or_name)
            else:
                directory = self.get(id_or_name).path
            self._delete_dir(directory)
        return directory.name

    def prune(self, now: float | datetime | None = None) -> builtins.list[SnapshotInfo]:
        """Delete every snapshot past its ``expires_at`` (``keep`` does not protect from
        expiry) and leftovers of interrupted work; returns those deleted."""
        when = now.timestamp() if isinstance(now, datetime) else (time.time() if now is None else now)
        removed = []
        with self._locked():
            for info in self._manifests():
                if info.expired(when):
                    self._delete_dir(info.path)
                    removed.append(info)
            self._sweep_leftovers()
        return removed

    def _sweep_leftovers(self) -> None:
        for entry in self.root.iterdir():
            match = re.fullmatch(r"\.(staging|restore|trash)-(snap_[0-9a-f]{16})-(\d+)(?:-.*)?", entry.name)
            if not match:
                continue
            if match.group(1) == "trash" or not _pid_alive(int(match.group(3))):
                shutil.rmtree(entry, ignore_errors=True)

    def remove_for_sandbox(self, sandbox_id: str) -> builtins.list[SnapshotInfo]:
        """On destroy: delete the sandbox's snapshots except those created with ``keep=True``."""
        removed = []
        with self._locked():
            for info in self._manifests():
                if info.sandbox_id == sandbox_id and not info.keep:
                    self._delete_dir(info.path)
                    removed.append(info)
        return removed


class PendingSnapshot:
    """A snapshot being written (:meth:`SnapshotStore.begin`): ``id``, a private staging
    directory in the store, blobs streamed in with :meth:`stream`. :meth:`commit` seals
    the rest, signs the manifest and publishes it atomically; :meth:`discard` (also on
    leaving the ``with`` block without a commit) removes every trace."""

    def __init__(self, store: SnapshotStore, snap_id: str, name: str, sandbox_id: str, when: datetime,
                 expires_at: str | None, keep: bool, staging: Path):
        self.store = store
        self.id = snap_id
        self.name = name
        self.sandbox_id = sandbox_id
        self.staging = staging
        self._when = when
        self._expires_at = expires_at
        self._keep = keep
        self._key = store.key
        self._sinks: dict[str, SealSink] = {}
        self._blobs = 0
        self._state = "open"  # open | committed | discarded

    def _next_blob(self) -> str:
        blob = f"{BLOBS}/{self._blobs:06d}.sealed"
        self._blobs += 1
        return blob

    def _require_open(self) -> None:
        if self._state != "open":
            raise InvalidArgument("snapshot", f"pending snapshot {self.id} is already {self._state}")

    def stream(self, rel: str) -> SealSink:
        """A sink that seals the stream it is given into this snapshot as file ``rel``
        (same format and manifest entry as a file sealed at :meth:`commit`)."""
        self._require_open()
        if not _safe_rel(rel):
            raise InvalidArgument("rel", f"{rel!r} is not a safe relative path")
        if rel in self._sinks:
            raise InvalidArgument("rel", f"{rel!r} is already streamed into snapshot {self.id}")
        sink = SealSink(self.staging / (blob := self._next_blob()), blob, rel, self._key, _context(self.id, rel),
                        self.store.chunk_size)
        self._sinks[rel] = sink
        return sink

    def drop(self, rel: str) -> None:
        """Forget the stream of ``rel`` (its writer never used it)."""
        sink = self._sinks.pop(rel, None)
        if sink is not None:
            sink.close()
            (self.staging / sink.blob).unlink(missing_ok=True)

    def commit(self, kind: str, files_dir: Path | str | None = None, *, files: Iterable[str] | None = None,
               details: Mapping[str, Any] | None = None, progress: Progress | None = None) -> SnapshotInfo:
        """Wait for every streamed blob (:class:`SandboxError` if one failed), seal the
        files of ``files_dir`` (all, or just ``files``), sign the manifest and publish
        the snapshot. On any error the whole pending snapshot is discarded."""
        self._require_open()
        try:
            SnapshotStore._check_kind(kind)
            clean_details = json.loads(canonical_json(dict(details or {}), field="details"))
            source = Path(files_dir) if files_dir is not None else None
            rels = SnapshotStore._collect(source, files) if source is not None else []
            twice = sorted(set(rels) & set(self._sinks))
            if twice:
                raise InvalidArgument("files", f"{twice[0]!r} was streamed already")
            key = self.store.key
            if key != self._key:
                raise InvalidArgument("key", "the store's snapshot key changed while the snapshot was written")
            sealed_files: list[SealedFile] = []
            for rel, sink in self._sinks.items():
                sink.finish()
                assert sink.info is not None
                sealed_files.append(SealedFile(rel, sink.blob, sink.info.size, sink.info.sealed_size,
                                               sink.info.sealed_sha256))
            assert source is not None or not rels
            total = sum(os.lstat(source / r).st_size for r in rels) if source is not None else 0
            done_before = 0
            for rel in rels:
                assert source is not None
                blob = self._next_blob()
                base = done_before

                def step(done: int, _total: int, base: int = base) -> None:
                    if progress is not None:
                        progress(base + done, total)

                info = seal_file(source / rel, self.staging / blob, key, context=_context(self.id, rel),
                                 chunk_size=self.store.chunk_size, progress=step)
                done_before += info.size
                sealed_files.append(SealedFile(rel, blob, info.size, info.sealed_size, info.sealed_sha256))
            sealed_files.sort(key=lambda f: f.path)
            manifest = SealedSnapshot(id=self.id, name=self.name, sandbox_id=self.sandbox_id, kind=kind,
                                      created_at=format_ts(self._when), expires_at=self._expires_at, keep=self._keep,
                                      chunk_size=self.store.chunk_size, key_check=_key_check(key),
                                      files=tuple(sealed_files), details=clean_details)
            write_private_atomic(self.staging / MANIFEST, manifest.signed(self.store.signer))
            fsync_dir(self.staging / BLOBS)
            root = self.store.root
            with self.store._locked():
                if self.store._name_taken(self.name, self.sandbox_id):
                    raise self.store._name_taken_error(self.name, self.sandbox_id)
                os.rename(self.staging, root / self.id)
            self._state = "committed"
            fsync_dir(root)
        except BaseException:
            self.discard()
            raise
        return SnapshotInfo.from_manifest(manifest, root / self.id)

    def discard(self) -> None:
        """Stop every stream and remove the staging directory (idempotent)."""
        if self._state == "committed":
            return
        self._state = "discarded"
        for sink in self._sinks.values():
            sink.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> PendingSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


@dataclass
class OpenedSnapshot:
    """A verified snapshot opened for restore (:meth:`SnapshotStore.restoring`):
    ``path`` holds the unsealed files, :meth:`source` streams the others."""

    info: SnapshotInfo
    manifest: SealedSnapshot
    path: Path
    sources: dict[str, UnsealSource]

    def source(self, rel: str) -> UnsealSource | None:
        """The stream of ``rel`` if it was opened for streaming, else None."""
        return self.sources.get(rel)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        shutil.rmtree(self.path, ignore_errors=True)
