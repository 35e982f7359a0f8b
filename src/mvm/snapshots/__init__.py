"""Sealed snapshots of sandboxes, in one package along its seams:

* :mod:`.seal_stream` — the chunked AES-256-GCM codec, and the helper process QEMU's
  migration streams through (stdlib + ``cryptography`` only: it runs as a script);
* :mod:`.seal`        — the seal format on files (``seal_file`` / ``unseal_file``), the master key;
* :mod:`.manifest`    — the signed manifest and the verification of a snapshot's blobs;
* :mod:`.streams`     — ``SealSink`` / ``UnsealSource``: streams sealed or unsealed by the helper;
* :mod:`.store`       — the catalogue (``SnapshotStore``): list, find, write, open for restore, prune;
* :mod:`.save_restore` — a backend instance saved into / restored from the store (the supervisor's path).

docs/security.md ("Sealed snapshots") describes the format and the threat model.
"""

from __future__ import annotations

from .manifest import SIG_DOMAIN, SealedFile, SealedSnapshot, verify_snapshot
from .save_restore import restore, save, shape
from .seal import seal_file, snapshot_key, unseal_file
from .seal_stream import DEFAULT_CHUNK_SIZE, HEADER_SIZE, MAGIC, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TAG_SIZE, SealInfo
from .store import DEFAULT_EXPIRES, OpenedSnapshot, PendingSnapshot, SnapshotInfo, SnapshotStore
from .streams import SEAL_STREAM_SCRIPT, SealSink, UnsealSource

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_EXPIRES",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "SEAL_STREAM_SCRIPT",
    "SIG_DOMAIN",
    "TAG_SIZE",
    "OpenedSnapshot",
    "PendingSnapshot",
    "SealInfo",
    "SealSink",
    "SealedFile",
    "SealedSnapshot",
    "SnapshotInfo",
    "SnapshotStore",
    "UnsealSource",
    "restore",
    "save",
    "seal_file",
    "shape",
    "snapshot_key",
    "unseal_file",
    "verify_snapshot",
]
