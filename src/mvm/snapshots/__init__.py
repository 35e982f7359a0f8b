"""Sealed snapshots of sandboxes, in one package along its seams:

* :mod:`.model`       — :class:`Snapshot`, the one snapshot type every layer uses (stdlib only);
* :mod:`.seal_stream` — the chunked AES-256-GCM codec, and the helper process QEMU's
  migration streams through (stdlib + ``cryptography`` only: it runs as a script);
* :mod:`.seal`        — the seal format on files (``seal_file`` / ``unseal_file``), the master key;
* :mod:`.manifest`    — the signed manifest and the verification of a snapshot's blobs;
* :mod:`.streams`     — ``SealSink`` / ``UnsealSource``: streams sealed or unsealed by the helper;
* :mod:`.store`       — the catalogue (``SnapshotStore``): list, find, write, open for restore, prune;
* :mod:`.save_restore` — a backend instance saved into / restored from the store (the supervisor's path).

docs/security.md ("Sealed snapshots") describes the format and the threat model.

Names are loaded on first use (PEP 562): ``mvm.snapshots.model`` (the SDK's ``mvm.Snapshot``)
does not pull in the sealing code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

_LAZY = {
    "DEFAULT_CHUNK_SIZE": ".seal_stream",
    "DEFAULT_EXPIRES": ".store",
    "HEADER_SIZE": ".seal_stream",
    "MAGIC": ".seal_stream",
    "MAX_CHUNK_SIZE": ".seal_stream",
    "MIN_CHUNK_SIZE": ".seal_stream",
    "Manifest": ".manifest",
    "OpenedSnapshot": ".store",
    "PendingSnapshot": ".store",
    "SEAL_STREAM_SCRIPT": ".streams",
    "SIG_DOMAIN": ".manifest",
    "SealInfo": ".seal_stream",
    "SealSink": ".streams",
    "SealedFile": ".manifest",
    "Snapshot": ".model",
    "SnapshotKind": ".model",
    "SnapshotStore": ".store",
    "TAG_SIZE": ".seal_stream",
    "UnsealSource": ".streams",
    "restore": ".save_restore",
    "save": ".save_restore",
    "seal_file": ".seal",
    "shape": ".save_restore",
    "snapshot_key": ".seal",
    "unseal_file": ".seal",
    "verify_snapshot": ".manifest",
}
__all__ = sorted(_LAZY)


if TYPE_CHECKING:  # type checkers and IDEs see the same names as plain imports ("X as X": re-exported)
    from .manifest import (
        Manifest as Manifest,
        SIG_DOMAIN as SIG_DOMAIN,
        SealedFile as SealedFile,
        verify_snapshot as verify_snapshot,
    )
    from .model import (
        Snapshot as Snapshot,
        SnapshotKind as SnapshotKind,
    )
    from .save_restore import (
        restore as restore,
        save as save,
        shape as shape,
    )
    from .seal import (
        seal_file as seal_file,
        snapshot_key as snapshot_key,
        unseal_file as unseal_file,
    )
    from .seal_stream import (
        DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE,
        HEADER_SIZE as HEADER_SIZE,
        MAGIC as MAGIC,
        MAX_CHUNK_SIZE as MAX_CHUNK_SIZE,
        MIN_CHUNK_SIZE as MIN_CHUNK_SIZE,
        SealInfo as SealInfo,
        TAG_SIZE as TAG_SIZE,
    )
    from .store import (
        DEFAULT_EXPIRES as DEFAULT_EXPIRES,
        OpenedSnapshot as OpenedSnapshot,
        PendingSnapshot as PendingSnapshot,
        SnapshotStore as SnapshotStore,
    )
    from .streams import (
        SEAL_STREAM_SCRIPT as SEAL_STREAM_SCRIPT,
        SealSink as SealSink,
        UnsealSource as UnsealSource,
    )
else:
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
