"""Secret references, the encrypted host keystore, resolution, and output redaction.

* :class:`SecretRef` — what ``mvm.secret(name)`` returns: a name, never a value.
* :class:`Keystore` — ``$MVM_HOME/secrets/<name>.secret`` (0600 JSON), each value
  sealed with AES-256-GCM under ``$MVM_HOME/keys/secrets.key`` with a fresh random
  nonce and the secret's name in the associated data (a file renamed or copied to
  another name no longer decrypts).
* :func:`resolve_secret` — keystore first, then ``MVM_SECRET_<NAME>`` in the caller's
  environment; :func:`secret_available` answers the same question for plan mode.
* :class:`Redactor` / :class:`StreamRedactor` — replace every known value with
  ``[redacted:NAME]`` in ``str``/``bytes``, including a value split across chunks.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AnyStr, cast, overload

from mvm import paths
from mvm.errors import InvalidArgument, KeystoreError, SecretNotFound, kind_of, shown

from ..osutil import ensure_private_dir, read_private, write_private_atomic
from .canonical import b64decode, b64encode, format_ts, utc_now

# The crypto library (and the key module that needs it) is imported where a value is
# actually encrypted or decrypted: `import mvm` and the supervisor stay fast.

__all__ = [
    "MIN_REDACT_LEN",
    "SECRET_NAME_PATTERN",
    "Keystore",
    "Redactor",
    "SecretRef",
    "StreamRedactor",
    "env_var_for",
    "redact_stream",
    "resolve_secret",
    "secret",
    "secret_available",
    "validate_secret_name",
]

SECRET_NAME_PATTERN = r"[A-Za-z0-9_.-]{1,128}"
_NAME_RE = re.compile(SECRET_NAME_PATTERN)
_ALLOWED = "1-128 characters from A-Z a-z 0-9 _ . -"
#: Values shorter than this are not redacted (too likely to appear by chance).
MIN_REDACT_LEN = 4
#: Largest value the keystore accepts (it ends up in a process environment).
MAX_SECRET_BYTES = 1 << 20
_AD_PREFIX = b"mvm-secret-v1\0"
_SUFFIX = ".secret"


def validate_secret_name(name: Any, field: str = "secret name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(field, f"{shown(name)} is not a valid secret name", allowed=_ALLOWED)
    return name


@dataclass(frozen=True)
class SecretRef:
    """A reference to a secret by name (``mvm.secret("api-key")``); holds no value.

    Usable as an env value; the value is resolved only in live mode, only for the
    process that asked.
    """

    name: str

    def __post_init__(self) -> None:
        validate_secret_name(self.name)

    def to_dict(self) -> dict[str, str]:
        """The form used in recordings / the IR: ``{"secret": NAME}``."""
        return {"secret": self.name}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SecretRef:
        return cls(raw["secret"])

    def __str__(self) -> str:
        return f"<secret {self.name}>"


def secret(name: str) -> SecretRef:
    """``mvm.secret(name)``."""
    return SecretRef(name)


def env_var_for(name: str) -> str:
    """``MVM_SECRET_<NAME>``: upper-cased, ``-`` and ``.`` become ``_``
    (so ``api-key`` and ``api.key`` share ``MVM_SECRET_API_KEY``)."""
    validate_secret_name(name)
    return "MVM_SECRET_" + name.upper().replace("-", "_").replace(".", "_")


def _hint(name: str) -> str:
    return f"set it with `mvmctl secret set {name}` or export {env_var_for(name)}"


class Keystore:
    """The host keystore. Values are only ever on disk as AES-256-GCM ciphertext.

    ``Keystore()`` uses ``paths.secrets_dir()`` and ``keys_dir()/secrets.key`` (created
    on the first ``set``). All methods validate the name (:class:`InvalidArgument`).
    """

    def __init__(self, root: Path | None = None):
        self._root = Path(root) if root is not None else None

    @property
    def root(self) -> Path:
        return ensure_private_dir(self._root if self._root is not None else paths.secrets_dir())

    def _path(self, name: str) -> Path:
        return self.root / (validate_secret_name(name) + _SUFFIX)

    @staticmethod
    def _ad(name: str) -> bytes:
        return _AD_PREFIX + name.encode("ascii")

    def _read_record(self, path: Path, name: str) -> dict[str, Any]:
        try:
            record = json.loads(read_private(path))
        except FileNotFoundError:
            raise SecretNotFound(name, hint=_hint(name)) from None
        except (OSError, ValueError) as exc:
            raise KeystoreError(f"keystore entry for secret {shown(name)} is unreadable: {exc}", name=name) from None
        if not isinstance(record, dict) or record.get("v") != 1:
            raise KeystoreError(f"keystore entry for secret {shown(name)} has an unknown format", name=name)
        return record

    def set(self, name: str, value: str) -> dict[str, str]:
        """Store (or replace) ``name``; returns its metadata ``{name, created_at, updated_at}``."""
        path = self._path(name)
        if not isinstance(value, str):
            raise InvalidArgument("secret value", f"must be a string, not {kind_of(value)}")
        raw = value.encode("utf-8")
        if not raw:
            raise InvalidArgument("secret value", "must not be empty")
        if "\0" in value:
            raise InvalidArgument("secret value", "must not contain a NUL character (it goes into an environment)")
        if len(raw) > MAX_SECRET_BYTES:
            raise InvalidArgument("secret value", f"is {len(raw)} bytes", allowed=f"at most {MAX_SECRET_BYTES} bytes")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from .keys import SECRETS_KEY_FILE, symmetric_key

        key = symmetric_key(SECRETS_KEY_FILE)
        assert key is not None
        now = format_ts(utc_now())
        created = now
        if path.exists():
            try:
                created = str(self._read_record(path, name).get("created_at") or now)
            except KeystoreError:
                created = now
        nonce = os.urandom(12)
        ciphertext = AESGCM(key).encrypt(nonce, raw, self._ad(name))
        record = {"v": 1, "name": name, "alg": "AES-256-GCM", "created_at": created, "updated_at": now,
                  "nonce": b64encode(nonce), "ciphertext": b64encode(ciphertext)}
        write_private_atomic(path, json.dumps(record, sort_keys=True).encode() + b"\n")
        return {"name": name, "created_at": created, "updated_at": now}

    def get(self, name: str) -> str:
        """The value of ``name``; :class:`SecretNotFound` if absent, :class:`KeystoreError`
        if the entry does not decrypt (wrong key, edited, renamed from another name)."""
        path = self._path(name)
        record = self._read_record(path, name)
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from .keys import SECRETS_KEY_FILE, symmetric_key

        key = symmetric_key(SECRETS_KEY_FILE, create=False)
        if key is None:
            raise KeystoreError(f"secret {shown(name)} exists but the keystore key "
                                f"(keys/{SECRETS_KEY_FILE}) is missing", name=name)
        try:
            nonce = b64decode(record["nonce"])
            plain = AESGCM(key).decrypt(nonce, b64decode(record["ciphertext"]), self._ad(name))
        except (InvalidTag, KeyError, ValueError, TypeError):
            raise KeystoreError(f"keystore entry for secret {shown(name)} does not decrypt "
                                "(edited, moved from another name, or a different keystore key)",
                                name=name) from None
        return plain.decode("utf-8")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._path(name).is_file()

    def names(self) -> list[dict[str, str]]:
        """``[{name, created_at, updated_at}]`` sorted by name; never a value."""
        out = []
        for path in sorted(self.root.glob("*" + _SUFFIX)):
            name = path.name[: -len(_SUFFIX)]
            if not _NAME_RE.fullmatch(name):
                continue
            try:
                record = self._read_record(path, name)
            except (KeystoreError, SecretNotFound):
                continue
            out.append({"name": name, "created_at": str(record.get("created_at", "")),
                        "updated_at": str(record.get("updated_at", ""))})
        return out

    def remove(self, name: str) -> None:
        """Delete ``name``; :class:`SecretNotFound` if it was not set."""
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise SecretNotFound(name, hint=_hint(name)) from None


def resolve_secret(name: str, environ: Mapping[str, str] | None = None, *,
                   keystore: Keystore | None = None) -> str:
    """The value of secret ``name``: the keystore first, then ``MVM_SECRET_<NAME>`` in
    ``environ`` (default ``os.environ``). :class:`SecretNotFound` when neither has it."""
    validate_secret_name(name)
    store = keystore or Keystore()
    if name in store:
        return store.get(name)
    env = os.environ if environ is None else environ
    value = env.get(env_var_for(name))
    if value is None:
        raise SecretNotFound(name, hint=_hint(name))
    return value


def secret_available(name: str, environ: Mapping[str, str] | None = None, *,
                     keystore: Keystore | None = None) -> bool:
    """Whether :func:`resolve_secret` would find ``name`` (for plan mode). Keystore
    entries are checked by presence only, so no value is decrypted or kept."""
    validate_secret_name(name)
    store = keystore or Keystore()
    if name in store:
        return True
    env = os.environ if environ is None else environ
    return env_var_for(name) in env


# ---- redaction ----------------------------------------------------------------


class Redactor:
    """Replaces every occurrence of each known secret value with ``[redacted:NAME]``.

    ``values`` maps secret name → value. Values shorter than :data:`MIN_REDACT_LEN`
    are not redacted (see :attr:`skipped`). Longer values win where they overlap
    (``"abcdef"`` is replaced whole, not as ``"abcd"`` + ``"ef"``).

    ``redact(text)`` works on ``str`` and ``bytes``; :meth:`stream` gives a
    :class:`StreamRedactor` for output that arrives in chunks.
    """

    def __init__(self, values: Mapping[str, str]):
        by_value: dict[str, str] = {}
        self.skipped: list[str] = []
        for name in sorted(values):
            value = values[name]
            if not isinstance(value, str) or len(value) < MIN_REDACT_LEN:
                self.skipped.append(name)
                continue
            by_value.setdefault(value, name)
        ordered = sorted(by_value, key=lambda v: (-len(v), v))
        self._str_map = {v: f"[redacted:{by_value[v]}]" for v in ordered}
        self._bytes_map = {v.encode("utf-8"): r.encode("utf-8") for v, r in self._str_map.items()}
        self._str_re = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None
        self._bytes_re = (re.compile(b"|".join(re.escape(v.encode("utf-8")) for v in ordered))
                          if ordered else None)
        #: Longest value in characters / UTF-8 bytes (the stream carry is one less).
        self.max_chars = max((len(v) for v in ordered), default=0)
        self.max_bytes = max((len(v) for v in self._bytes_map), default=0)

    def __bool__(self) -> bool:
        return self._str_re is not None

    @overload
    def redact(self, data: str) -> str: ...
    @overload
    def redact(self, data: bytes | bytearray | memoryview) -> bytes: ...
    def redact(self, data: str | bytes | bytearray | memoryview) -> str | bytes:
        """``data`` with every known value replaced (``str`` for ``str``, else ``bytes``)."""
        if isinstance(data, str):
            if self._str_re is None:
                return data
            str_map = self._str_map
            return self._str_re.sub(lambda m: str_map[m.group(0)], data)
        if isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            if self._bytes_re is None:
                return raw
            bytes_map = self._bytes_map
            return self._bytes_re.sub(lambda m: bytes_map[m.group(0)], raw)
        raise TypeError(f"cannot redact {type(data).__name__}")

    def redact_obj(self, obj: Any) -> Any:
        """Redact every str/bytes inside nested dicts/lists/tuples (keys too)."""
        if isinstance(obj, (str, bytes, bytearray)):
            return self.redact(obj)
        if isinstance(obj, Mapping):
            return {self.redact_obj(k): self.redact_obj(v) for k, v in obj.items()}
        if isinstance(obj, tuple):
            return tuple(self.redact_obj(v) for v in obj)
        if isinstance(obj, list):
            return [self.redact_obj(v) for v in obj]
        return obj

    def stream(self) -> StreamRedactor:
        """A fresh per-stream redactor (one per stdout, one per stderr, …)."""
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts a stream chunk by chunk: ``feed(chunk)`` returns what is safe to emit now,
    ``flush()`` the rest at end of stream. Output concatenated equals
    ``redactor.redact(whole stream)`` however the stream was split.

    It holds back at most ``len(longest value) - 1`` characters/bytes; str and bytes
    streams are supported (do not mix them in one stream).
    """

    def __init__(self, redactor: Redactor):
        self._r = redactor
        self._carry: str | bytes | None = None

    def feed(self, chunk: AnyStr) -> AnyStr:
        r = self._r
        if not r:
            return chunk
        if isinstance(chunk, str):
            return self._feed(chunk, "", r._str_re, r._str_map, r.max_chars)
        return self._feed(bytes(chunk), b"", r._bytes_re, r._bytes_map, r.max_bytes)

    def _feed(self, chunk: AnyStr, empty: AnyStr, pattern: re.Pattern[AnyStr] | None,
              mapping: Mapping[AnyStr, AnyStr], longest: int) -> AnyStr:
        if self._carry is None:
            self._carry = empty
        elif isinstance(self._carry, str) != isinstance(chunk, str):
            raise TypeError("cannot mix str and bytes chunks in one stream")
        # the check above leaves the carry of the chunk's type
        buf = cast(AnyStr, self._carry) + chunk
        assert pattern is not None
        # A match starting before ``boundary`` is fully decided by ``buf``: every value
        # that could start there ends inside it.
        boundary = len(buf) - longest + 1
        out: list[AnyStr] = []
        pos = 0
        for m in pattern.finditer(buf):
            if m.start() >= boundary:
                break
            out.append(buf[pos:m.start()])
            out.append(mapping[m.group(0)])
            pos = m.end()
        cut = max(pos, boundary, 0)
        out.append(buf[pos:cut])
        self._carry = buf[cut:]
        return empty.join(out)

    def flush(self) -> str | bytes:
        """The held-back tail, redacted: of the chunks' type, or ``""`` if nothing was fed."""
        carry = self._carry
        self._carry = None
        if carry is None:
            return ""
        return self._r.redact(carry)

    @property
    def pending(self) -> int:
        """How many characters/bytes are held back waiting for the next chunk."""
        return len(self._carry or "")


def redact_stream(chunks: Iterable[AnyStr], redactor: Redactor) -> Iterator[AnyStr]:
    """Yield ``chunks`` redacted, handling values split across chunk boundaries."""
    state = redactor.stream()
    for chunk in chunks:
        out = state.feed(chunk)
        if out:
            yield out
    tail = state.flush()
    if tail:
        yield cast(AnyStr, tail)  # a non-empty tail has the chunks' type
