"""The snapshot catalogue: sealed snapshots on disk, listed, found, written, opened for
restore, pruned.

Snapshot directory (``SnapshotStore``; dirs 0700, files 0600)::

    $MVM_HOME/snapshots/
      .lock                         flock for create/remove/prune (shared while restoring)
      snap_<16 hex>/
        manifest.json               signed (host Ed25519 key, domain "mvm-snapshot-v1")
        blobs/000000.sealed ...     one sealed file per snapshotted file

A stored snapshot is described by one type, :class:`~.model.Snapshot` (what ``list``,
``get`` and ``commit`` return and what goes over the wire). The manifest lists, per
file, its relative path, plain size, sealed size and the sha256
of the sealed bytes, plus name, sandbox_id, kind, created_at, expires_at, keep and
details. :func:`verify_snapshot` checks the signature and every blob's size and hash
before a single byte is unsealed; anything wrong raises :class:`SnapshotTampered`
naming the file. The master key is ``$MVM_HOME/keys/snapshot.key`` (0600).
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import paths
from ..durations import DURATION_HELP, parse_duration
from ..errors import InvalidArgument, SnapshotNotFound, SnapshotTampered
from ..osutil import ensure_private_dir, fsync_dir, make_dirs, pid_alive, write_private_atomic
from ..security.canonical import canonical_json, format_ts, parse_ts
from ..security.keys import host_signing_key
from .manifest import (
    BLOBS,
    MANIFEST,
    SealedFile,
    Manifest,
    context_for,
    key_check,
    read_manifest,
    safe_rel,
    verify_blobs,
)
from .seal import Progress, seal_file, snapshot_key, unseal_file
from .model import Snapshot
from .seal_stream import DEFAULT_CHUNK_SIZE
from .streams import SealSink, UnsealSource

#: Retention when ``create(expires=None)``; ``MVM_SNAPSHOT_EXPIRES`` overrides it.
DEFAULT_EXPIRES = "7d"
_ID_RE = re.compile(r"snap_[0-9a-f]{16}")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_NEVER = ("never", "none", "forever")


def _ts_float(text: str | None) -> float | None:
    return None if text is None else parse_ts(text).timestamp()


def snapshot_of(manifest: Manifest, directory: Path) -> Snapshot:
    """The :class:`Snapshot` a verified manifest describes (``directory``: where it is
    stored, for its size on disk)."""
    return Snapshot(id=manifest.id, name=manifest.name, sandbox_id=manifest.sandbox_id,
                    kind=manifest.kind,  # type: ignore[arg-type]  # checked by _KIND_RE when sealed
                    created_at=_ts_float(manifest.created_at) or 0.0, expires_at=_ts_float(manifest.expires_at),
                    size_bytes=sum(f.sealed_size for f in manifest.files) + _file_size(directory / MANIFEST),
                    keep=manifest.keep, plain_bytes=sum(f.size for f in manifest.files),
                    files=tuple(f.path for f in manifest.files), details=dict(manifest.details))


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _default_expires() -> str:
    return os.environ.get("MVM_SNAPSHOT_EXPIRES") or DEFAULT_EXPIRES


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

    def path(self, snapshot: Snapshot | str) -> Path:
        """The directory a snapshot (or snapshot id) is stored in."""
        snap_id = snapshot.id if isinstance(snapshot, Snapshot) else snapshot
        if not isinstance(snap_id, str) or not _ID_RE.fullmatch(snap_id):
            raise InvalidArgument("snapshot", f"{snap_id!r} is not a snapshot id", allowed="snap_ and 16 hex digits")
        return self.root / snap_id

    def _read(self, snap_id: str) -> tuple[Snapshot, Manifest]:
        directory = self.root / snap_id
        manifest = read_manifest(directory, self.signer.public_key())
        return snapshot_of(manifest, directory), manifest

    def _manifests(self) -> list[tuple[Snapshot, Manifest]]:
        out = []
        for sid in self._ids():
            try:
                out.append(self._read(sid))
            except SnapshotTampered:
                continue
        return out

    def list(self, *, sandbox_id: str | None = None) -> list[Snapshot]:
        """Every snapshot whose manifest verifies (oldest first), optionally one sandbox's.
        See :meth:`problems` for those that do not."""
        return [snap for snap, _ in self._find_all(sandbox_id)]

    def _find_all(self, sandbox_id: str | None = None) -> builtins.list[tuple[Snapshot, Manifest]]:
        found = [pair for pair in self._manifests() if sandbox_id is None or pair[0].sandbox_id == sandbox_id]
        return sorted(found, key=lambda pair: (pair[0].created_at, pair[0].id))

    def problems(self) -> dict[str, str]:
        """``{snapshot id: why its manifest is refused}`` for snapshots ``list`` leaves out."""
        out = {}
        public = self.signer.public_key()
        for sid in self._ids():
            try:
                read_manifest(self.root / sid, public)
            except SnapshotTampered as exc:
                out[sid] = exc.message
        return out

    def get(self, id_or_name: str, *, sandbox_id: str | None = None) -> Snapshot:
        """By id (``snap_…``) or by name (optionally within one sandbox). A name used by
        several sandboxes' snapshots must be qualified (``sandbox_id``) or given as an id.
        :class:`SnapshotNotFound`; :class:`SnapshotTampered` if its manifest is bad."""
        return self._find(id_or_name, sandbox_id=sandbox_id)[0]

    def _find(self, id_or_name: str, *, sandbox_id: str | None = None) -> tuple[Snapshot, Manifest]:
        """:meth:`get`, with the signed manifest it was read from (its signature verified):
        a restore checks the blobs against it instead of reading the manifest again."""
        if not isinstance(id_or_name, str) or not id_or_name:
            raise InvalidArgument("snapshot", f"{id_or_name!r}", allowed="a snapshot id (snap_…) or name")
        if _ID_RE.fullmatch(id_or_name):
            if not (self.root / id_or_name).is_dir():
                raise SnapshotNotFound(f"no snapshot {id_or_name}", snapshot=id_or_name)
            return self._read(id_or_name)
        matches = [pair for pair in self._find_all(sandbox_id) if pair[0].name == id_or_name]
        if not matches:
            raise SnapshotNotFound(f"no snapshot named {id_or_name!r}", snapshot=id_or_name)
        if len(matches) > 1:
            raise InvalidArgument("snapshot", f"name {id_or_name!r} is used by several snapshots",
                                  allowed=", ".join(f"{s.id} (sandbox {s.sandbox_id})" for s, _ in matches))
        return matches[0]

    def verify(self, id_or_name: str) -> Snapshot:
        """Full check (signature, every blob, the key) without unsealing."""
        snap, manifest = self._find(id_or_name)
        verify_blobs(self.path(snap), self.signer.public_key(), self.key, keep_open=(), manifest=manifest)
        return snap

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
               progress: Progress | None = None, now: datetime | float | None = None) -> Snapshot:
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
        return any(s.name == name and s.sandbox_id == sandbox_id for s, _ in self._manifests())

    @staticmethod
    def _collect(source: Path, files: Iterable[str] | None) -> builtins.list[str]:
        if not source.is_dir():
            raise InvalidArgument("files_dir", f"{source} is not a directory")
        rels: list[str] = []
        if files is not None:
            for rel in files:
                if not safe_rel(rel):
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
                  progress: Progress | None = None, now: float | None = None) -> Iterator[OpenedSnapshot]:
        """Like :meth:`open_for_restore`, but the files named in ``stream`` (those the
        snapshot has) are not unsealed to disk: ``opened.source(rel)`` streams each as
        plaintext to its reader (QEMU's ``-incoming exec:``). Everything else is verified
        first as there (signature, every blob's size and sha256); a streamed blob is
        checked for its size here and read once, by its unsealer, through the very file
        descriptor that was checked: each chunk is authenticated before it is written,
        and the last one only if the whole blob's sha256 is the signed manifest's — so
        its reader never completes a stream of another blob, and ``source.finish()``
        (which the caller must wait for before using what was read) raises
        :class:`SnapshotTampered` for it. The unsealed directory and every source are
        removed/closed when the block ends."""
        opened = self._open(id_or_name, tuple(stream), dest_parent, progress, now)
        try:
            yield opened
        finally:
            opened.close()

    def _open(self, id_or_name: str, stream: tuple[str, ...], dest_parent: Path | str | None,
              progress: Progress | None, now: float | None) -> OpenedSnapshot:
        with self._locked(shared=True):
            info, manifest = self._find(id_or_name)
            directory = self.path(info)
            if info.expired(now):
                raise SnapshotNotFound(f"snapshot {info.id} ({info.name}) expired at "
                                       f"{format_ts(info.expires_at or 0)}", snapshot=info.id)
            key = self.key
            # the manifest get() read and verified, under this same lock: not read a second time
            manifest, fds = verify_blobs(directory, self.signer.public_key(), key, keep_open=stream,
                                         manifest=manifest)
            parent = make_dirs(Path(dest_parent)) if dest_parent is not None else self.root
            sources: dict[str, UnsealSource] = {}
            out: Path | None = None
            try:
                out = Path(tempfile.mkdtemp(prefix=f".restore-{info.id}-{os.getpid()}-", dir=parent))
                os.chmod(out, 0o700)
                for f in manifest.files:
                    if f.path in fds:
                        sources[f.path] = UnsealSource(fds.pop(f.path), key, manifest, f)
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
                        size = unseal_file(directory / f.blob, target, key, context=manifest.context(f.path),
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
                directory = self.path(self.get(id_or_name))
            self._delete_dir(directory)
        return directory.name

    def prune(self, now: float | datetime | None = None) -> builtins.list[Snapshot]:
        """Delete every snapshot past its ``expires_at`` (``keep`` does not protect from
        expiry) and leftovers of interrupted work; returns those deleted."""
        when = now.timestamp() if isinstance(now, datetime) else (time.time() if now is None else now)
        removed = []
        with self._locked():
            for info, _ in self._manifests():
                if info.expired(when):
                    self._delete_dir(self.path(info))
                    removed.append(info)
            self._sweep_leftovers()
        return removed

    def sweep_leftovers(self) -> None:
        """Remove what a killed writer or restorer left in the store (a half-written
        ``.staging-`` snapshot, a ``.restore-`` directory of unsealed files) once its
        process is gone. The reaper of a dead sandbox calls it."""
        with self._locked():
            self._sweep_leftovers()

    def _sweep_leftovers(self) -> None:
        for entry in self.root.iterdir():
            match = re.fullmatch(r"\.(staging|restore|trash)-(snap_[0-9a-f]{16})-(\d+)(?:-.*)?", entry.name)
            if not match:
                continue
            if match.group(1) == "trash" or not pid_alive(int(match.group(3))):
                shutil.rmtree(entry, ignore_errors=True)

    def remove_for_sandbox(self, sandbox_id: str) -> builtins.list[Snapshot]:
        """On destroy: delete the sandbox's snapshots except those created with ``keep=True``."""
        removed = []
        with self._locked():
            for info, _ in self._manifests():
                if info.sandbox_id == sandbox_id and not info.keep:
                    self._delete_dir(self.path(info))
                    removed.append(info)
        return removed


class PendingSnapshot:
    """A write in progress (:meth:`SnapshotStore.begin`), not yet a :class:`Snapshot`
    (that is what :meth:`commit` returns): ``id``, a private staging
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
        if not safe_rel(rel):
            raise InvalidArgument("rel", f"{rel!r} is not a safe relative path")
        if rel in self._sinks:
            raise InvalidArgument("rel", f"{rel!r} is already streamed into snapshot {self.id}")
        sink = SealSink(self.staging / (blob := self._next_blob()), blob, rel, self._key, context_for(self.id, rel),
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
               details: Mapping[str, Any] | None = None, progress: Progress | None = None) -> Snapshot:
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

                info = seal_file(source / rel, self.staging / blob, key, context=context_for(self.id, rel),
                                 chunk_size=self.store.chunk_size, progress=step)
                done_before += info.size
                sealed_files.append(SealedFile(rel, blob, info.size, info.sealed_size, info.sealed_sha256))
            sealed_files.sort(key=lambda f: f.path)
            manifest = Manifest(id=self.id, name=self.name, sandbox_id=self.sandbox_id, kind=kind,
                                      created_at=format_ts(self._when), expires_at=self._expires_at, keep=self._keep,
                                      chunk_size=self.store.chunk_size, key_check=key_check(key),
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
        return snapshot_of(manifest, root / self.id)

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
    """A handle on a verified snapshot opened for restore (:meth:`SnapshotStore.restoring`),
    not a snapshot itself: ``info`` is the :class:`Snapshot`, ``manifest`` what was
    verified, ``path`` a private directory with the unsealed files, :meth:`source`
    streams the others."""

    info: Snapshot
    manifest: Manifest
    path: Path
    sources: dict[str, UnsealSource]

    def source(self, rel: str) -> UnsealSource | None:
        """The stream of ``rel`` if it was opened for streaming, else None."""
        return self.sources.get(rel)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        shutil.rmtree(self.path, ignore_errors=True)
