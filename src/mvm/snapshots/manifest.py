"""A snapshot's signed manifest (Ed25519, domain ``mvm-snapshot-v1``): what it lists,
how it is read and checked, and the verification of the blobs it lists (size and sha256
of every one, nothing added) before a single byte is unsealed — but for a streamed blob
(a VM's memory image), whose unsealer checks its sha256 while streaming it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import InvalidArgument, SnapshotTampered
from ..security.canonical import canonical_json
from ..security.keys import PublicKeyLike, key_id, load_public_key, sign, verify_signature

SIG_DOMAIN = b"mvm-snapshot-v1"
MANIFEST = "manifest.json"
BLOBS = "blobs"


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
class Manifest:
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
    def from_body(cls, body: Mapping[str, Any]) -> Manifest:
        return cls(id=body["id"], name=body["name"], sandbox_id=body["sandbox_id"], kind=body["kind"],
                   created_at=body["created_at"], expires_at=body["expires_at"], keep=bool(body["keep"]),
                   chunk_size=int(body["chunk_size"]), key_check=body["key_check"],
                   files=tuple(SealedFile(**f) for f in body["files"]), details=dict(body.get("details") or {}))

    def context(self, rel: str) -> bytes:
        return context_for(self.id, rel)


def context_for(snapshot_id: str, rel: str) -> bytes:
    """What binds a sealed file to its snapshot and path (the AEAD's associated data)."""
    return b"mvm-snapshot-v1\0" + snapshot_id.encode() + b"\0" + rel.encode("utf-8")


def key_check(key: bytes) -> str:
    return hashlib.sha256(b"mvm-snapshot-key-check\0" + bytes(key)).hexdigest()[:16]


def safe_rel(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        return False
    pure = PurePosixPath(rel)
    return not pure.is_absolute() and all(p not in ("", ".", "..") for p in rel.split("/"))


def read_manifest(directory: Path, public_key: PublicKeyLike = None) -> Manifest:
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
        manifest = Manifest.from_body(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise tampered(f"is malformed ({exc})") from None
    if manifest.id != snap:
        raise tampered(f"belongs to snapshot {manifest.id}, not {snap} (directories swapped or renamed)")
    for f in manifest.files:
        if not safe_rel(f.path) or not safe_rel(f.blob):
            raise tampered(f"has an unsafe path {f.path!r} / {f.blob!r}")
    return manifest


def verify_snapshot(directory: Path | str, public_key: PublicKeyLike = None, *,
                    key: bytes | None = None) -> Manifest:
    """Check a snapshot directory before anything is unsealed: the manifest's signature
    (default: host key), that it is this directory's, that every listed blob exists with
    the listed size and sha256, that nothing else is there, and (if ``key`` is given)
    that it was sealed with that key. Returns the manifest; raises
    :class:`SnapshotTampered` naming the first bad file.
    """
    manifest, _ = verify_blobs(Path(directory), public_key, key, keep_open=())
    return manifest


def verify_blobs(directory: Path, public_key: PublicKeyLike, key: bytes | None, keep_open: Iterable[str],
                 manifest: Manifest | None = None) -> tuple[Manifest, dict[str, int]]:
    """:func:`verify_snapshot`, except for the sha256 of the blobs of the files named in
    ``keep_open``: those are checked (regular file, size) and returned as open read-only
    fds, for a reader that hashes them as it streams them (the unsealer, against the
    same signed manifest) and must not reopen them by name; the caller closes them.
    ``manifest``: this directory's, already read by :func:`read_manifest` (not read again)."""
    if manifest is None:
        manifest = read_manifest(directory, public_key)
    snap = manifest.id
    wanted = set(keep_open)

    def tampered(file: str, problem: str, original: str | None = None) -> SnapshotTampered:
        label = f"{file} ({original})" if original else file
        return SnapshotTampered(f"snapshot {snap}: {label}: {problem}", file=file, path=original, snapshot=snap)

    if key is not None and key_check(key) != manifest.key_check:
        raise tampered(MANIFEST, "was sealed with a different snapshot key")
    expected = {f.blob for f in manifest.files}
    kept: dict[str, int] = {}
    try:
        for f in manifest.files:
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
                if f.path not in wanted:
                    with open(fd, "rb", closefd=False) as fh:
                        actual = hashlib.file_digest(fh, "sha256").hexdigest()
                    if actual != f.sealed_sha256:
                        raise tampered(f.blob, "sha256 does not match the manifest (modified or swapped)", f.path)
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
        for fd in kept.values():
            os.close(fd)
        raise
    return manifest, kept
