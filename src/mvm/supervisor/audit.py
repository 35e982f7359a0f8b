"""The supervisor's audit hook: every operation gets an ``audit_id`` and a signed,
hash-chained entry in ``$MVM_HOME/audit/<sandbox_id>.jsonl`` (mvm.security.audit).

Argument values are reduced to sha256 digests, so no file content or secret
reaches a record. The acting client is identified by its socket's peer
credentials (SO_PEERCRED). A one-line summary also goes to the sandbox's log so
``logs()`` shows what happened when.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from .logbook import LogBook

_current = threading.local()


def set_actor(actor: dict[str, Any] | None) -> None:
    """Bind the client on whose behalf this thread works (None: the supervisor itself)."""
    _current.actor = actor


class Auditor:
    def __init__(self, sandbox_id: str, logs: LogBook):
        self.sandbox_id = sandbox_id
        self._logs = logs
        # Loading the signing key (and the crypto library) overlaps with the guest's boot.
        self._log: Future[Any] = Future()
        threading.Thread(target=self._open, name="mvm-audit-open", daemon=True).start()

    def _open(self) -> None:
        try:
            from ..security.audit import AuditLog

            self._log.set_result(AuditLog.for_sandbox(self.sandbox_id))
        except BaseException as exc:  # surfaced on the first record()
            self._log.set_exception(exc)

    @property
    def signer(self) -> Any:
        """The host key the log signs with (loaded once; receipts are signed with it too)."""
        return self._log.result().signer

    def record(
        self,
        op: str,
        args: dict[str, Any],
        *,
        outcome: str = "ok",
        error_type: str | None = None,
        details: dict[str, Any] | None = None,
        actor: dict[str, Any] | None = None,
    ) -> str:
        """``actor`` (default: the client this thread serves, else the supervisor itself)."""
        actor = actor or getattr(_current, "actor", None)
        entry = self._log.result().append(
            op, args, outcome=outcome, error_type=error_type, details=details, actor=actor
        )
        audit_id = str(entry["audit_id"])
        summary = f"{op} {outcome}" + (f" ({error_type})" if error_type else "")
        self._logs.write("audit", "system", summary, audit_id, force=True)
        return audit_id
