"""Append-only, hash-chained, Ed25519-signed audit logs.

Layout (survives ``destroy``; not inside the sandbox directory)::

    $MVM_HOME/audit/                 0700
      <sandbox_id>.jsonl             0600, one canonical-JSON entry per line
      index.jsonl                    0600, host-wide: audit_id -> sandbox_id, seq, op, ts, log

Each entry::

    {v, seq, audit_id, ts, sandbox_id, actor: {pid, uid, user}, op,
     args_digest: {key: "sha256:..."}, outcome: "ok"|"error", error_type?, details,
     prev_hash, key_id, hash, sig}

``hash`` = sha256 hex of the RFC 8785 canonical JSON of the entry without ``hash`` and
``sig``; ``prev_hash`` is the previous entry's ``hash`` (64 zeros for seq 1); ``sig`` is
base64 Ed25519 over ``b"mvm-audit-v1\\0" + hash`` (ASCII hex) with the host key.
Lines are written in canonical form, so any byte edit is detected.

Appends take an exclusive ``flock`` on the log, read the tail under the lock, write one
line and ``fdatasync`` it: safe across threads and processes. The index is a lookup
cache (written after the log; never ahead of it) and lets :func:`verify` notice the
last entries being cut off.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mvm import paths
from mvm.errors import AuditEntryNotFound, AuditError, InvalidArgument, KeystoreError

from ..osutil import ensure_private_dir, make_dirs
from .canonical import canonical_json, canonical_object, format_ts, sha256_digest, sha256_hex, utc_now
from .keys import PublicKeyLike, host_signing_key, key_id, load_public_key, sign, verify_signature

__all__ = [
    "GENESIS_HASH",
    "SIG_DOMAIN",
    "AuditLog",
    "VerifyReport",
    "actor_for",
    "audit_dir",
    "current_actor",
    "digest_args",
    "find",
    "follow",
    "index_path",
    "log_path",
    "new_audit_id",
    "tail",
    "verify",
    "verify_entry",
]

GENESIS_HASH = "0" * 64
SIG_DOMAIN = b"mvm-audit-v1"
MAX_DETAILS_BYTES = 4096
_SANDBOX_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_OP_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
AUDIT_ID_RE = re.compile(r"aud_[0-9a-f]{16,40}")
_REQUIRED = ("v", "seq", "audit_id", "ts", "sandbox_id", "actor", "op", "args_digest", "outcome",
             "details", "prev_hash", "key_id", "hash", "sig")


def audit_dir() -> Path:
    """``$MVM_HOME/audit`` (0700)."""
    return ensure_private_dir(paths.mvm_home() / "audit")


def index_path() -> Path:
    return audit_dir() / "index.jsonl"


def _check_sandbox_id(sandbox_id: Any) -> str:
    if not isinstance(sandbox_id, str) or not _SANDBOX_ID_RE.fullmatch(sandbox_id) or sandbox_id == "index":
        raise InvalidArgument("sandbox_id", f"{sandbox_id!r} is not a valid sandbox id",
                              allowed="1-128 characters from A-Z a-z 0-9 _ . - (not starting with . or -)")
    return sandbox_id


def log_path(sandbox_id: str) -> Path:
    """``$MVM_HOME/audit/<sandbox_id>.jsonl``."""
    return audit_dir() / f"{_check_sandbox_id(sandbox_id)}.jsonl"


def new_audit_id() -> str:
    """``aud_`` + 12 hex digits of milliseconds since the epoch + 16 random hex digits:
    unique, and sorts by creation time."""
    return f"aud_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"


def _digest_value(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return sha256_digest(bytes(value))
    return sha256_digest(canonical_json(_jsonable(value), field="args"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=lambda v: canonical_json(v)) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"sha256": sha256_hex(bytes(value))}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "to_dict"):  # e.g. SecretRef -> {"secret": name}
        return _jsonable(value.to_dict())
    return str(value)


def digest_args(args: Mapping[str, Any] | None) -> dict[str, str]:
    """``{key: "sha256:<hex>"}``: bytes are hashed as they are, anything else as its
    canonical JSON. Pass secret *references* (names), never resolved values."""
    return {str(k): _digest_value(v) for k, v in sorted((args or {}).items())}


_USERS: dict[int, str] = {}


def _user_name(uid: int) -> str:
    if uid not in _USERS:
        try:
            _USERS[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _USERS[uid] = str(uid)
    return _USERS[uid]


def actor_for(pid: int, uid: int) -> dict[str, Any]:
    """The actor record for a peer (e.g. from ``SO_PEERCRED`` on the control socket)."""
    return {"pid": int(pid), "uid": int(uid), "user": _user_name(int(uid))}


def current_actor() -> dict[str, Any]:
    return actor_for(os.getpid(), os.getuid())


def _entry_hash(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    return sha256_hex(canonical_json(body))


def _read_last_line(fd: int, size: int) -> bytes:
    """The last complete line of the file (without its newline); b"" if none."""
    end = size
    block = 8192
    buf = b""
    pos = end
    while pos > 0:
        step = min(block, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        body = buf[:-1] if buf.endswith(b"\n") else buf
        nl = body.rfind(b"\n")
        if nl >= 0:
            return body[nl + 1:]
        block *= 2
    return buf[:-1] if buf.endswith(b"\n") else buf


class AuditLog:
    """One sandbox's audit log.

    ``AuditLog(path, signer)`` — ``signer`` is an Ed25519 private key (default: the
    host key). ``sandbox_id`` defaults to the file's stem. ``index`` is the host-wide
    index to add each entry to (default ``$MVM_HOME/audit/index.jsonl``; ``None`` for
    none). :meth:`for_sandbox` gives the standard one. ``fsync=False`` skips the
    per-append ``fdatasync`` (benchmarks only: an acknowledged entry could be lost in a
    crash).
    """

    def __init__(self, path: Path | str, signer: Ed25519PrivateKey | None = None, *,
                 sandbox_id: str | None = None, index: Path | str | bool | None = True, fsync: bool = True):
        self.path = Path(path)
        self.signer = signer if signer is not None else host_signing_key()
        self.sandbox_id = _check_sandbox_id(sandbox_id if sandbox_id is not None else self.path.stem)
        self.key_id = key_id(self.signer)
        if index is True:
            self.index: Path | None = index_path()
        elif index in (None, False):
            self.index = None
        else:
            self.index = Path(index)  # type: ignore[arg-type]
        self.fsync = fsync
        make_dirs(self.path.parent)
        self._lock = threading.Lock()
        self._tail: tuple[int, int, int, str] | None = None  # (inode, size, seq, hash)
        self._sync_lock = threading.Lock()
        self._durable_seq = 0  # every entry up to this seq is known fdatasync'ed

    @classmethod
    def for_sandbox(cls, sandbox_id: str, signer: Ed25519PrivateKey | None = None) -> AuditLog:
        return cls(log_path(sandbox_id), signer, sandbox_id=sandbox_id)

    def _last(self, fd: int) -> tuple[int, str]:
        st = os.fstat(fd)
        if self._tail and self._tail[0] == st.st_ino and self._tail[1] == st.st_size:
            return self._tail[2], self._tail[3]
        size = st.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A write that never completed (crash mid-append): it was never acknowledged,
            # so cut it off rather than chain onto garbage.
            keep = _read_last_line(fd, size)  # the torn fragment itself
            size -= len(keep)
            os.ftruncate(fd, size)
        if size == 0:
            return 0, GENESIS_HASH
        line = _read_last_line(fd, size)
        try:
            last = json.loads(line)
            return int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"audit log {self.path} ends with an unreadable entry; "
                             f"run `mvmctl audit verify` (refusing to extend it)", path=str(self.path)) from None

    def append(self, op: str, args: Mapping[str, Any] | None = None, *, outcome: str = "ok",
               error_type: str | None = None, details: Mapping[str, Any] | None = None,
               actor: Mapping[str, Any] | None = None, audit_id: str | None = None,
               redactor: Any = None, durable: bool = True) -> dict[str, Any]:
        """Append one entry and return it (``entry["audit_id"]``).

        ``durable=False``: the entry is written (visible, chained) but not ``fdatasync``'ed
        here; :meth:`make_durable` with its ``seq`` does that, off the caller's path.

        ``args`` values are reduced to digests (:func:`digest_args`). ``details`` must be
        small (≤ 4 KiB as JSON) and non-secret; a ``redactor`` (``Redactor``) is applied
        to it anyway. ``actor`` defaults to this process; ``audit_id`` may be allocated
        beforehand with :func:`new_audit_id`.
        """
        if not isinstance(op, str) or not _OP_RE.fullmatch(op):
            raise InvalidArgument("op", f"{op!r} is not an operation name",
                                  allowed="letters, digits, _ . : - (max 64), e.g. 'command.run'")
        if outcome not in ("ok", "error"):
            raise InvalidArgument("outcome", f"{outcome!r}", allowed="'ok', 'error'")
        audit_id = audit_id or new_audit_id()
        if not AUDIT_ID_RE.fullmatch(audit_id):
            raise InvalidArgument("audit_id", f"{audit_id!r}", allowed="aud_ + 16-40 lowercase hex digits")
        clean_details = _jsonable(dict(details or {}))
        if redactor:
            clean_details = redactor.redact_obj(clean_details)
        base: dict[str, Any] = {
            "v": 1,
            "audit_id": audit_id,
            "sandbox_id": self.sandbox_id,
            "actor": dict(actor) if actor is not None else current_actor(),
            "op": op,
            "args_digest": digest_args(args),
            "outcome": outcome,
            "details": clean_details,
            "key_id": self.key_id,
        }
        if error_type is not None:
            base["error_type"] = str(error_type)[:128]
        # Each value is canonicalised once; the body (hashed) and the line (written) are
        # assembled from the same pieces: exactly canonical_json(body) / canonical_json(entry).
        pieces = {k: canonical_json(v, field=k) for k, v in base.items()}
        if len(pieces["details"]) > MAX_DETAILS_BYTES:
            raise InvalidArgument("details", "is too large for an audit entry",
                                  allowed=f"at most {MAX_DETAILS_BYTES} bytes of JSON")
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                seq, prev = self._last(fd)
                entry = dict(base, seq=seq + 1, prev_hash=prev, ts=format_ts(utc_now()))
                for k in ("seq", "prev_hash", "ts"):
                    pieces[k] = canonical_json(entry[k])
                entry["hash"] = sha256_hex(canonical_object(pieces))
                entry["sig"] = sign(self.signer, SIG_DOMAIN, entry["hash"].encode("ascii"))
                pieces["hash"] = canonical_json(entry["hash"])
                pieces["sig"] = canonical_json(entry["sig"])
                line = canonical_object(pieces) + b"\n"
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync and durable:
                    os.fdatasync(fd)
                st = os.fstat(fd)
                self._tail = (st.st_ino, st.st_size, entry["seq"], entry["hash"])
                if durable:
                    self._durable_seq = max(self._durable_seq, entry["seq"])
            finally:
                os.close(fd)  # releases the flock
        if self.index is not None:
            _append_index(self.index, {"audit_id": audit_id, "sandbox_id": self.sandbox_id, "seq": entry["seq"],
                                       "op": op, "ts": entry["ts"], "log": str(self.path.absolute())})
        return entry

    def make_durable(self, seq: int) -> None:
        """Return once the entry ``seq`` (appended with ``durable=False``) is on disk. One
        ``fdatasync`` covers every entry written before it, so callers waiting at once
        share it (group commit); an entry already covered costs nothing."""
        if not self.fsync:
            return
        with self._sync_lock:
            if self._durable_seq >= seq:
                return
            with self._lock:
                written = self._tail[2] if self._tail is not None else seq
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self._durable_seq = max(self._durable_seq, written)

    def verify(self, public_key: PublicKeyLike = None) -> VerifyReport:
        return verify(self.path, public_key if public_key is not None else self.signer.public_key(),
                      sandbox_id=self.sandbox_id, index=self.index if self.index is not None else False)


def _append_index(path: Path, record: dict[str, Any]) -> None:
    if not os.path.isdir(path.parent):  # (one stat, not pathlib's walk: once per audit entry)
        make_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    finally:
        os.close(fd)


# ---- reading ------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`. ``entries`` counts entries that verified (all of them
    when ``ok``); ``first_bad_seq`` is the first sequence number that is not as it
    should be (the missing one for a deletion, the position for an insertion or
    reordering); ``problem`` says what was found."""

    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str | None = None
    last_hash: str = GENESIS_HASH
    sandbox_id: str | None = None

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_entry(entry: Mapping[str, Any], public_key: PublicKeyLike = None) -> bool:
    """Whether one entry's hash and signature are intact (not its place in the chain)."""
    try:
        public = load_public_key(public_key)
        return (_entry_hash(entry) == entry["hash"]
                and verify_signature(public, SIG_DOMAIN, str(entry["hash"]).encode("ascii"), str(entry["sig"])))
    except (KeyError, TypeError, InvalidArgument, KeystoreError):
        return False


def _index_max_seq(index: Path, sandbox_id: str) -> int:
    best = 0
    try:
        with open(index, "rb") as fh:
            needle = f'"sandbox_id":"{sandbox_id}"'.encode()
            for raw in fh:
                if needle not in raw:
                    continue
                try:
                    record = json.loads(raw)
                    if record.get("sandbox_id") == sandbox_id:
                        best = max(best, int(record.get("seq", 0)))
                except (ValueError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return best


def verify(path: Path | str, public_key: PublicKeyLike = None, *, sandbox_id: str | None = None,
           index: Path | str | bool | None = True) -> VerifyReport:
    """Check a whole log: order, chain, hashes, canonical form, signatures, one sandbox.

    ``public_key``: anything :func:`keys.load_public_key` takes (default: the host key).
    ``index`` (default: ``index.jsonl`` beside the log, if present) is cross-checked so
    cutting off the newest entries is noticed too. Never raises for a bad log.
    """
    path = Path(path)
    try:
        public = load_public_key(public_key)
    except (KeystoreError, InvalidArgument) as exc:
        return VerifyReport(False, 0, None, exc.message)
    kid = key_id(public)
    if not path.is_file():
        return VerifyReport(False, 0, None, f"no audit log at {path}")

    # Pass 1: where each seq sits, to tell a deletion from a reordering or an insertion.
    where: dict[int, list[int]] = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                where.setdefault(int(json.loads(raw)["seq"]), []).append(lineno)
            except (ValueError, KeyError, TypeError):
                continue

    expected = 1
    prev = GENESIS_HASH
    count = 0
    sid = sandbox_id

    def bad(problem: str) -> VerifyReport:
        return VerifyReport(False, count, expected, problem, prev, sid)

    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            at = f"entry seq {expected} (line {lineno})"
            if not raw.endswith(b"\n"):
                return bad(f"{at}: incomplete last line (torn write or truncated file)")
            try:
                entry = json.loads(raw)
            except ValueError:
                return bad(f"{at}: not valid JSON (entry edited or corrupted)")
            if not isinstance(entry, dict):
                return bad(f"{at}: not a JSON object")
            missing = [k for k in _REQUIRED if k not in entry]
            if missing:
                return bad(f"{at}: missing field(s) {', '.join(missing)} (entry edited)")
            seq = entry["seq"]
            if not isinstance(seq, int) or seq != expected:
                if isinstance(seq, int) and seq < expected:
                    return bad(f"line {lineno} holds seq {seq} again where seq {expected} belongs "
                               "(entry inserted or duplicated)")
                later = [n for n in where.get(expected, []) if n > lineno]
                if later:
                    return bad(f"entry seq {expected} is out of order: it is at line {later[0]}, "
                               f"but line {lineno} holds seq {seq} (entries reordered)")
                return bad(f"entry seq {expected} is missing: line {lineno} holds seq {seq} "
                           "(entry deleted)")
            if entry["prev_hash"] != prev:
                return bad(f"{at}: prev_hash does not match entry seq {expected - 1}'s hash "
                           "(chain broken: entry inserted, deleted or replaced)")
            try:
                computed = _entry_hash(entry)
            except InvalidArgument:
                return bad(f"{at}: content cannot be canonicalised (entry edited)")
            if computed != entry["hash"]:
                return bad(f"{at}: content does not match its hash (entry edited)")
            if canonical_json(entry) + b"\n" != raw:
                return bad(f"{at}: line is not in canonical form (entry edited)")
            if entry["key_id"] != kid:
                return bad(f"{at}: signed by key {entry['key_id']}, not by the key given ({kid}): wrong key")
            if not verify_signature(public, SIG_DOMAIN, str(entry["hash"]).encode("ascii"), str(entry["sig"])):
                return bad(f"{at}: signature does not verify (entry forged or edited)")
            if sid is None:
                sid = entry["sandbox_id"]
            elif entry["sandbox_id"] != sid:
                return bad(f"{at}: belongs to sandbox {entry['sandbox_id']!r}, not {sid!r} "
                           "(entry copied from another log)")
            prev = entry["hash"]
            count += 1
            expected += 1

    if index is True:
        index_file: Path | None = path.parent / "index.jsonl"
    elif index in (None, False):
        index_file = None
    else:
        index_file = Path(index)  # type: ignore[arg-type]
    if sid is None and _SANDBOX_ID_RE.fullmatch(path.stem):
        sid = path.stem
    if index_file is not None and sid is not None and index_file.is_file():
        recorded = _index_max_seq(index_file, sid)
        if recorded > count:
            return bad(f"entries after seq {count} are missing: the host index records seq {recorded} "
                       "(newest entries deleted)")
    return VerifyReport(True, count, None, None, prev, sid)


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
        if isinstance(entry, dict):
            return entry
    except ValueError:
        pass
    return {"corrupt": True, "line": raw[:200].decode("utf-8", "replace")}


def _tail_offset(fh: IO[bytes], size: int, n: int) -> int:
    """Offset where the last ``n`` complete lines start."""
    if n <= 0:
        return size
    pos = size
    found = 0
    block = 8192
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        chunk = fh.read(step)
        # newlines in this chunk, scanning backwards; the file's final "\n" ends the last line
        idx = len(chunk)
        while True:
            idx = chunk.rfind(b"\n", 0, idx)
            if idx < 0:
                break
            if pos + idx == size - 1:
                continue
            found += 1
            if found == n:
                return pos + idx + 1
    return 0


def _complete_size(fh: IO[bytes]) -> int:
    """Size up to and including the last newline (a torn tail is not a line yet)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    if size == 0:
        return 0
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return size
    pos = size
    while pos > 0:
        step = min(8192, pos)
        pos -= step
        fh.seek(pos)
        idx = fh.read(step).rfind(b"\n")
        if idx >= 0:
            return pos + idx + 1
    return 0


def tail(path: Path | str, n: int = 10) -> list[dict[str, Any]]:
    """The last ``n`` entries (oldest first). A line that does not parse is returned as
    ``{"corrupt": True, "line": ...}``; run :func:`verify` to judge the log."""
    try:
        with open(path, "rb") as fh:
            size = _complete_size(fh)
            start = _tail_offset(fh, size, n)
            fh.seek(start)
            data = fh.read(size - start)
    except FileNotFoundError:
        return []
    return [_parse_line(line) for line in data.splitlines() if line]


def follow(path: Path | str, *, last: int = 10, poll_interval: float = 0.2,
           stop: Callable[[], bool] | None = None, timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Yield the last ``last`` entries, then each new entry as it is appended (``tail -f``).

    Waits for the file to appear; starts over if the file is replaced or truncated.
    Ends when ``stop()`` returns true or ``timeout`` seconds after the call (``None``:
    never); closing the generator also ends it.
    """
    path = Path(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    fh = None
    inode = None
    offset = 0
    pending = b""
    try:
        while True:
            if fh is None:
                try:
                    fh = open(path, "rb")  # noqa: SIM115 - held across yields, closed in finally
                    inode = os.fstat(fh.fileno()).st_ino
                    size = _complete_size(fh)
                    offset = _tail_offset(fh, size, last) if last is not None else 0
                    pending = b""
                except FileNotFoundError:
                    fh = None
            if fh is not None:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    st = None
                if st is None or st.st_ino != inode or st.st_size < offset + len(pending):
                    fh.close()  # replaced or truncated: start over from its beginning
                    fh = None
                    last = 0x7FFFFFFF
                    continue
                fh.seek(offset + len(pending))
                data = fh.read()
                if data:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        offset += len(line) + 1
                        if line:
                            yield _parse_line(line)
                    continue
            if stop is not None and stop():
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(poll_interval)
    finally:
        if fh is not None:
            fh.close()


def find(audit_id: str) -> dict[str, Any]:
    """The entry with ``audit_id`` from any sandbox's log (destroyed sandboxes included).

    Uses the host index, then falls back to scanning every log. :class:`AuditEntryNotFound`
    if no log has it.
    """
    if not isinstance(audit_id, str) or not AUDIT_ID_RE.fullmatch(audit_id):
        raise InvalidArgument("audit_id", f"{audit_id!r} is not an audit id", allowed="aud_ + 16-40 hex digits")
    directory = audit_dir()
    needle = audit_id.encode()
    candidates: list[tuple[Path, int | None]] = []
    try:
        with open(directory / "index.jsonl", "rb") as fh:
            for raw in fh:
                if needle in raw:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if record.get("audit_id") == audit_id:
                        log = record.get("log")
                        sid = record.get("sandbox_id")
                        if isinstance(sid, str) and _SANDBOX_ID_RE.fullmatch(sid):
                            candidates.append((directory / f"{sid}.jsonl", record.get("seq")))
                        if isinstance(log, str):
                            candidates.append((Path(log), record.get("seq")))
    except FileNotFoundError:
        pass
    candidates += [(p, None) for p in sorted(directory.glob("*.jsonl")) if p.name != "index.jsonl"]
    seen: set[Path] = set()
    for log, _seq in candidates:
        if log in seen or not log.is_file():
            continue
        seen.add(log)
        with open(log, "rb") as fh:
            for raw in fh:
                if needle in raw:
                    entry = _parse_line(raw)
                    if entry.get("audit_id") == audit_id:
                        return entry
    raise AuditEntryNotFound(f"no audit entry {audit_id}", audit_id=audit_id)
