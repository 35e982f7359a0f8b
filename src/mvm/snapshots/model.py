"""The one snapshot type: what a sealed snapshot is to every layer.

The store (:mod:`.store`) lists and returns it, the supervisor sends it over the wire
(``sandbox.snapshot``), the CLI prints it, the SDK hands it to its caller as
``mvm.Snapshot``, and the TypeScript SDK's ``Snapshot`` mirrors :meth:`Snapshot.to_wire`
field for field. What a snapshot is *made of* on disk (blobs, their hashes, the key
check) is its signed :class:`~mvm.snapshots.manifest.Manifest`, which never leaves the
store; handles for a snapshot being written or opened for restore are in :mod:`.store`.

Neutral and light: stdlib only, so ``import mvm`` does not pay for the sealing code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

#: ``full``: memory + disk (VM); ``filesystem``: the writable filesystem (namespaces);
#: ``recorded``: a placeholder returned in record/plan mode (nothing was saved).
SnapshotKind = Literal["full", "filesystem", "recorded"]


@dataclass(frozen=True)
class Snapshot:
    """A saved sandbox state, sealed at rest. Times are epoch seconds (``expires_at``
    ``None``: never expires); ``size_bytes`` is what it takes on disk, ``plain_bytes``
    what it holds unsealed; ``files`` the snapshotted files (relative names);
    ``details`` the backend's signed metadata (e.g. the sandbox's resources);
    ``audit_id`` the audit record of the save that made it (set on the reply to
    ``sandbox.snapshot`` only)."""

    id: str
    name: str
    sandbox_id: str
    kind: SnapshotKind
    created_at: float
    expires_at: float | None
    size_bytes: int
    keep: bool = False
    plain_bytes: int = 0
    files: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict, compare=False)
    audit_id: str | None = None

    def age_seconds(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.created_at

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of every field (what :meth:`from_wire` reads back)."""
        return {"id": self.id, "name": self.name, "sandbox_id": self.sandbox_id, "kind": self.kind,
                "created_at": self.created_at, "expires_at": self.expires_at, "size_bytes": self.size_bytes,
                "keep": self.keep, "plain_bytes": self.plain_bytes, "files": list(self.files),
                "details": dict(self.details), "audit_id": self.audit_id}

    to_dict = to_wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Snapshot:
        """From :meth:`to_wire`'s dict; fields it does not know are ignored (a newer peer)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "files" in values:
            values["files"] = tuple(values["files"])
        if "details" in values:
            values["details"] = dict(values["details"] or {})
        return cls(**values)
