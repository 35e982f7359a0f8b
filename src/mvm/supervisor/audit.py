"""The supervisor's audit hook: every operation gets an ``audit_id`` and a signed,
hash-chained entry in ``$MVM_HOME/audit/<sandbox_id>.jsonl`` (mvm.security.audit).

Argument values are reduced to sha256 digests, so no file content or secret
reaches a record. The acting client is identified by its socket's peer
credentials (SO_PEERCRED). A one-line summary also goes to the sandbox's log so
``logs()`` shows what happened when.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
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
        # record_deferred's fdatasyncs (its thread starts on the first one)
        self._sync = ThreadPoolExecutor(1, thread_name_prefix="mvm-audit-sync")
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
        """Append ``op``'s entry, ``fdatasync``'ed before this returns; its ``audit_id``.
        ``actor`` (default: the client this thread serves, else the supervisor itself)."""
        return self._append(op, args, outcome=outcome, error_type=error_type, details=details, actor=actor,
                            durable=True)[0]

    def record_deferred(self, op: str, args: dict[str, Any], *,
                        details: dict[str, Any] | None = None) -> tuple[str, Future[None]]:
        """Append ``op``'s entry now and make it durable on the audit-sync thread: its
        ``audit_id`` and a future done once the entry is on disk. The caller waits for it
        where durability is owed (``exec.run``: before the reply and the first output byte)
        and meanwhile goes on; the ``fdatasync`` (0.05 ms quiet, ~1 ms while the journal
        commits other files) then overlaps the command's run instead of preceding it."""
        audit_id, seq = self._append(op, args, outcome="ok", error_type=None, details=details, actor=None,
                                     durable=False)
        return audit_id, self._sync.submit(self._log.result().make_durable, seq)

    def _append(self, op: str, args: dict[str, Any], *, outcome: str, error_type: str | None,
                details: dict[str, Any] | None, actor: dict[str, Any] | None, durable: bool) -> tuple[str, int]:
        actor = actor or getattr(_current, "actor", None)
        entry = self._log.result().append(
            op, args, outcome=outcome, error_type=error_type, details=details, actor=actor, durable=durable
        )
        audit_id = str(entry["audit_id"])
        summary = f"{op} {outcome}" + (f" ({error_type})" if error_type else "")
        self._logs.write("audit", "system", summary, audit_id, force=True)
        return audit_id, int(entry["seq"])
