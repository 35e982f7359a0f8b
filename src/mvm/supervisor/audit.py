"""The supervisor's audit hook: every operation gets an ``audit_id`` and an entry.

Entries go to the sandbox's log (``source="audit"``); argument values are
reduced to sha256 digests so no file content or secret reaches a record.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from typing import Any

from .logbook import LogBook


def new_audit_id() -> str:
    return "aud_" + secrets.token_hex(10)


def digest_args(args: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in sorted(args.items()):
        raw = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
        out[key] = "sha256:" + hashlib.sha256(raw).hexdigest()
    return out


class Auditor:
    def __init__(self, sandbox_id: str, logs: LogBook):
        self.sandbox_id = sandbox_id
        self._logs = logs

    def record(self, op: str, args: dict[str, Any], *, outcome: str = "ok", error_type: str | None = None,
               details: dict[str, Any] | None = None) -> str:
        audit_id = new_audit_id()
        entry = {"audit_id": audit_id, "ts": time.time(), "op": op, "actor": {"pid": os.getpid(), "uid": os.getuid()},
                 "args_digest": digest_args(args), "outcome": outcome}
        if error_type:
            entry["error_type"] = error_type
        if details:
            entry["details"] = details
        self._logs.write("audit", "system", json.dumps(entry, sort_keys=True), audit_id, force=True)
        return audit_id

    def close(self) -> None:
        pass
