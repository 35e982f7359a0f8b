"""Host keys under ``$MVM_HOME/keys`` (0700), each created on first use (0600).

* ``audit-ed25519.key`` — the host Ed25519 signing key (PKCS#8 PEM); its public half is
  exported beside it as ``audit-ed25519.pub`` (SubjectPublicKeyInfo PEM). It signs
  audit entries, receipts and snapshot manifests, each under its own domain prefix so a
  signature made for one can never be replayed as another.
* ``secrets.key`` — 32 raw bytes, the AES-256-GCM key of the secrets keystore.
* ``snapshot.key`` — 32 raw bytes, the AES-256-GCM key of sealed snapshots.

Creation is race-free (temp file + ``link``): two processes starting at once end up
with the same key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mvm import paths
from mvm.errors import InvalidArgument, KeystoreError

from ..osutil import create_private_exclusive, ensure_private_dir, read_private, write_private_atomic
from .canonical import b64decode, b64encode

__all__ = [
    "PUBLIC_KEY_FILE",
    "SECRETS_KEY_FILE",
    "SIGNING_KEY_FILE",
    "SNAPSHOT_KEY_FILE",
    "host_public_key",
    "host_public_key_path",
    "host_signing_key",
    "key_id",
    "keys_dir",
    "load_public_key",
    "sign",
    "symmetric_key",
    "verify_signature",
]

SIGNING_KEY_FILE = "audit-ed25519.key"
PUBLIC_KEY_FILE = "audit-ed25519.pub"
SECRETS_KEY_FILE = "secrets.key"
SNAPSHOT_KEY_FILE = "snapshot.key"

PublicKeyLike = Ed25519PublicKey | Ed25519PrivateKey | bytes | str | os.PathLike[str] | None


def keys_dir() -> Path:
    return ensure_private_dir(paths.keys_dir())


def _public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def host_signing_key() -> Ed25519PrivateKey:
    """The host Ed25519 key (created on first use); also (re)writes the ``.pub`` beside it."""
    directory = keys_dir()
    path = directory / SIGNING_KEY_FILE
    if not path.exists():
        fresh = Ed25519PrivateKey.generate()
        pem = fresh.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        create_private_exclusive(path, pem)
    try:
        key = serialization.load_pem_private_key(read_private(path), password=None)
    except ValueError as exc:
        raise KeystoreError(f"host signing key {path} is unreadable: {exc}", path=str(path)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeystoreError(f"host signing key {path} is not an Ed25519 key", path=str(path))
    pub_path = directory / PUBLIC_KEY_FILE
    pem = _public_pem(key.public_key())
    try:
        current = pub_path.read_bytes()
    except FileNotFoundError:
        current = b""
    if current != pem:
        write_private_atomic(pub_path, pem)
        os.chmod(pub_path, 0o644)  # public half: readable by anyone who wants to verify
    return key


def host_public_key_path() -> Path:
    """Path of the exported host public key (PEM), created with the key if needed."""
    host_signing_key()
    return keys_dir() / PUBLIC_KEY_FILE


def host_public_key() -> Ed25519PublicKey:
    return host_signing_key().public_key()


def load_public_key(key: PublicKeyLike = None) -> Ed25519PublicKey:
    """An Ed25519 public key from: ``None`` (the host key — never created here:
    :class:`KeystoreError` if this host has not signed anything yet), a key object, PEM
    bytes, 32 raw bytes, or a path to a PEM file (``.pub`` or the private ``.key``)."""
    if key is None:
        if not (keys_dir() / SIGNING_KEY_FILE).exists():
            raise KeystoreError(f"this host has no signing key yet ({keys_dir() / SIGNING_KEY_FILE}): "
                                "nothing was signed here; pass the signer's public key")
        return host_public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    data: bytes
    if isinstance(key, bytes):
        data = key
    elif isinstance(key, (str, os.PathLike)):
        try:
            data = Path(key).read_bytes()
        except OSError as exc:
            raise InvalidArgument("public_key", f"cannot read {key}: {exc.strerror}") from None
    else:
        raise InvalidArgument("public_key", f"unsupported type {type(key).__name__}",
                              allowed="Ed25519PublicKey, PEM bytes, 32 raw bytes, a path")
    if len(data) == 32 and not data.startswith(b"-----"):
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        if b"PRIVATE KEY" in data:
            loaded = serialization.load_pem_private_key(data, password=None)
            if isinstance(loaded, Ed25519PrivateKey):
                return loaded.public_key()
        else:
            loaded_pub = serialization.load_pem_public_key(data)
            if isinstance(loaded_pub, Ed25519PublicKey):
                return loaded_pub
    except ValueError:
        pass
    raise InvalidArgument("public_key", "not an Ed25519 key", allowed="Ed25519 PEM or 32 raw bytes")


#: key object's id -> (the key, its key_id): every receipt names its signer's key id, and
#: deriving it (public key, raw bytes, sha256) cost ~35 us a time. Few keys are ever loaded.
_KEY_IDS: dict[int, tuple[object, str]] = {}
_KEY_IDS_MAX = 64


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short, stable fingerprint: ``ed25519:<first 16 hex of sha256(raw public key)>``."""
    cached = _KEY_IDS.get(id(key))
    if cached is not None and cached[0] is key:
        return cached[1]
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    if len(_KEY_IDS) >= _KEY_IDS_MAX:
        _KEY_IDS.clear()
    _KEY_IDS[id(key)] = (key, kid)  # (holds the key: an id is not reused while it is cached)
    return kid


def symmetric_key(filename: str, *, create: bool = True) -> bytes | None:
    """A 32-byte AES key stored as ``keys_dir()/filename``; created on first use.

    With ``create=False`` returns ``None`` when it does not exist yet.
    """
    path = keys_dir() / filename
    if not path.exists():
        if not create:
            return None
        create_private_exclusive(path, os.urandom(32))
    data = read_private(path)
    if len(data) != 32:
        raise KeystoreError(f"key file {path} is corrupt (expected 32 bytes, found {len(data)})",
                            path=str(path))
    return data


def sign(key: Ed25519PrivateKey, domain: bytes, message: bytes) -> str:
    """Base64 Ed25519 signature over ``domain + b"\\0" + message``."""
    return b64encode(key.sign(domain + b"\0" + message))


def verify_signature(public: Ed25519PublicKey, domain: bytes, message: bytes, signature: str) -> bool:
    try:
        public.verify(b64decode(signature), domain + b"\0" + message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
