"""Signed command receipts.

A receipt says what ran and what came out, without holding either::

    {
      "v": 1, "type": "mvm.receipt", "receipt_id": "rcpt_<hex>", "audit_id": "aud_...",
      "sandbox_id": "...", "template": {"name": "...", "digest": "..."},
      "argv": {"sha256": "sha256:<hex of canonical JSON argv>", "count": N},
      "env_keys": ["PATH", ...],                       # names only, never values
      "exit_code": 0,
      "stdout": {"sha256": "sha256:...", "size": N}, "stderr": {...},
      "truncated": {"stdout": false, "stderr": false},
      "started_at": "...Z", "ended_at": "...Z", "duration_ms": 12.5,
      "signature": {"alg": "ed25519", "key_id": "ed25519:...", "sig": "<base64>"}
    }

``sig`` is Ed25519 (host key) over ``b"mvm-receipt-v1\\0" + canonical_json(receipt
without "signature")``. The output hashes are of the bytes given to
:func:`write_receipt` — pass what the caller got back (redacted, if redaction was on),
so ``sha256(result.stdout)`` can be checked against the receipt.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mvm.errors import InvalidArgument, KeystoreError

from ..osutil import make_dirs, write_private_atomic
from .canonical import canonical_json, format_ts, parse_ts, sha256_digest
from .keys import PublicKeyLike, host_signing_key, key_id, load_public_key, sign, verify_signature

__all__ = ["SIG_DOMAIN", "PruneReport", "ReceiptCheck", "StreamDigest", "prune_receipts", "read_receipt",
           "verify_receipt", "write_receipt"]

SIG_DOMAIN = b"mvm-receipt-v1"
#: The name ``write_receipt`` gives a receipt (``rcpt_`` + 20 hex digits); pruning touches no other file.
_RECEIPT_FILE = re.compile(r"rcpt_[0-9a-f]{20}\.json")
_FIELDS = ("v", "type", "receipt_id", "audit_id", "sandbox_id", "template", "argv", "env_keys", "exit_code",
           "stdout", "stderr", "truncated", "started_at", "ended_at", "duration_ms", "signature")


class ReceiptCheck(NamedTuple):
    """``(ok, problem)``; ``problem`` is ``None`` when ``ok``."""

    ok: bool
    problem: str | None


class StreamDigest(NamedTuple):
    """An output stream as a receipt holds it: ``sha256`` (``"sha256:<hex>"``) and ``size``.
    Given to :func:`write_receipt` instead of the bytes by a caller that hashed the output
    as it went (the supervisor: an ``exec.run``'s output is never kept whole for its receipt)."""

    sha256: str
    size: int

    @classmethod
    def of(cls, data: bytes) -> StreamDigest:
        return cls(sha256_digest(bytes(data)), len(data))


def _truncation(truncated: bool | Mapping[str, bool]) -> dict[str, bool]:
    if isinstance(truncated, Mapping):
        return {"stdout": bool(truncated.get("stdout", False)), "stderr": bool(truncated.get("stderr", False))}
    return {"stdout": bool(truncated), "stderr": bool(truncated)}


def write_receipt(directory: Path | str, *, sandbox_id: str, template: str, template_digest: str | None,
                  argv: Iterable[str], env_keys: Iterable[str], exit_code: int | None, stdout: bytes | StreamDigest,
                  stderr: bytes | StreamDigest, started_at: datetime | float | str, ended_at: datetime | float | str,
                  audit_id: str | None, truncated: bool | Mapping[str, bool],
                  signer: Ed25519PrivateKey | None = None, filename: str | None = None,
                  durable: bool = True) -> Path:
    """Write a signed receipt into ``directory`` (created 0700 if missing; the file is 0600) and
    return its path: ``<directory>/<receipt_id>.json`` unless ``filename`` is given.

    ``truncated``: one bool for both streams, or ``{"stdout": bool, "stderr": bool}``.
    Times: datetime, epoch seconds or ISO strings. ``signer`` defaults to the host key.
    ``durable=False``: not fsynced here (still written atomically); the caller makes it
    durable later (the supervisor: ``osutil.DeferredSync``, off the reply's path).
    """
    argv_list = list(argv)
    if not all(isinstance(a, str) for a in argv_list):
        raise InvalidArgument("argv", "every argument must be a str")
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
        raise InvalidArgument("exit_code", f"{exit_code!r}", allowed="an int or None")
    if filename is not None and (not filename or "/" in filename or filename in (".", "..")):
        raise InvalidArgument("filename", f"{filename!r} is not a plain file name")
    key = signer if signer is not None else host_signing_key()
    started = format_ts(started_at)
    ended = format_ts(ended_at)
    duration_ms = round((parse_ts(ended) - parse_ts(started)).total_seconds() * 1000, 3)
    receipt_id = "rcpt_" + secrets.token_hex(10)
    body: dict[str, Any] = {
        "v": 1,
        "type": "mvm.receipt",
        "receipt_id": receipt_id,
        "audit_id": audit_id,
        "sandbox_id": sandbox_id,
        "template": {"name": template, "digest": template_digest},
        "argv": {"sha256": sha256_digest(canonical_json(argv_list, field="argv")), "count": len(argv_list)},
        "env_keys": sorted({str(k) for k in env_keys}),
        "exit_code": exit_code,
        "stdout": _stream_entry(stdout),
        "stderr": _stream_entry(stderr),
        "truncated": _truncation(truncated),
        "started_at": started,
        "ended_at": ended,
        "duration_ms": duration_ms,
    }
    body["signature"] = {"alg": "ed25519", "key_id": key_id(key),
                         "sig": sign(key, SIG_DOMAIN, canonical_json(body))}
    directory = Path(directory)
    if not os.path.isdir(directory):  # (one stat: a supervisor writes one receipt per command)
        make_dirs(directory)
    path = directory / (filename or f"{receipt_id}.json")
    # sorted keys, no indent: the C encoder (an indented dump takes the pure-Python one, ~0.1 ms)
    write_private_atomic(path, json.dumps(body, sort_keys=True).encode() + b"\n", durable=durable)
    return path


class PruneReport(NamedTuple):
    """What :func:`prune_receipts` removed (or, with ``dry_run``, would remove) and kept."""

    removed: int
    removed_bytes: int
    kept: int


def prune_receipts(older_than: Any, *, directory: Path | str | None = None, dry_run: bool = False,
                   now: float | None = None) -> PruneReport:
    """Remove the receipts written more than ``older_than`` ago (a duration: ``"30d"``,
    ``"12h"``, seconds; see :mod:`mvm.durations`) from ``directory`` (default: this host's,
    ``$MVM_HOME/receipts``, where every ``commands.run`` leaves one and nothing else removes
    them). A receipt's age is its file's mtime (it is written once, when its command
    ended). Only files named as :func:`write_receipt` names them are considered: a receipt
    written under a ``filename`` of its own is the caller's to keep. ``InvalidArgument``
    naming ``older_than`` for a bad duration, before anything is touched."""
    from ..durations import parse_duration
    from ..paths import receipts_dir

    cutoff = (time.time() if now is None else now) - parse_duration(older_than, "older_than")
    folder = Path(directory) if directory is not None else receipts_dir(create=False)
    removed = removed_bytes = kept = 0
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return PruneReport(0, 0, 0)
    with entries:
        for entry in entries:
            if not _RECEIPT_FILE.fullmatch(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_mtime >= cutoff:
                    kept += 1
                    continue
                if not dry_run:
                    os.unlink(entry.path)
            except FileNotFoundError:  # pruned by another caller meanwhile
                continue
            removed += 1
            removed_bytes += st.st_size
    return PruneReport(removed, removed_bytes, kept)


def _stream_entry(stream: bytes | StreamDigest) -> dict[str, Any]:
    digest = stream if isinstance(stream, StreamDigest) else StreamDigest.of(stream)
    return {"sha256": digest.sha256, "size": digest.size}


def read_receipt(path: Path | str) -> dict[str, Any]:
    """The receipt as a dict (unverified; use :func:`verify_receipt`)."""
    data = json.loads(Path(path).read_bytes())
    if not isinstance(data, dict):
        raise InvalidArgument("receipt", f"{path} is not a receipt")
    return data


def verify_receipt(path: Path | str, public_key: PublicKeyLike = None, *, stdout: bytes | None = None,
                   stderr: bytes | None = None, argv: Iterable[str] | None = None) -> ReceiptCheck:
    """Check a receipt's signature (default key: the host's) and, if given, that
    ``stdout``/``stderr``/``argv`` match what it records. Never raises for a bad receipt."""
    try:
        receipt = read_receipt(path)
    except FileNotFoundError:
        return ReceiptCheck(False, f"no receipt at {path}")
    except (OSError, ValueError, InvalidArgument) as exc:
        return ReceiptCheck(False, f"not a readable receipt: {exc}")
    missing = [k for k in _FIELDS if k not in receipt]
    if missing:
        return ReceiptCheck(False, f"missing field(s): {', '.join(missing)} (edited?)")
    if receipt.get("type") != "mvm.receipt" or receipt.get("v") != 1:
        return ReceiptCheck(False, "not an mvm receipt (type/v)")
    signature = receipt.pop("signature")
    if not isinstance(signature, dict) or signature.get("alg") != "ed25519":
        return ReceiptCheck(False, "signature missing or not ed25519")
    try:
        public = load_public_key(public_key)
    except (KeystoreError, InvalidArgument) as exc:
        return ReceiptCheck(False, exc.message)
    kid = key_id(public)
    if signature.get("key_id") != kid:
        return ReceiptCheck(False, f"signed by key {signature.get('key_id')}, not by the key given ({kid}): wrong key")
    try:
        body = canonical_json(receipt)
    except InvalidArgument:
        return ReceiptCheck(False, "content cannot be canonicalised (edited)")
    if not verify_signature(public, SIG_DOMAIN, body, str(signature.get("sig", ""))):
        return ReceiptCheck(False, "signature does not verify: the receipt was edited or forged")
    for label, data in (("stdout", stdout), ("stderr", stderr)):
        if data is not None and receipt[label].get("sha256") != sha256_digest(bytes(data)):
            return ReceiptCheck(False, f"{label} given does not match the receipt's {label} hash")
    if argv is not None and receipt["argv"].get("sha256") != sha256_digest(canonical_json(list(argv))):
        return ReceiptCheck(False, "argv given does not match the receipt's argv hash")
    return ReceiptCheck(True, None)
