"""Boot once, restore many: the cache of "ready" snapshots.

A ready snapshot is a full snapshot (memory + frozen disk layer) of a freshly
booted VM whose agent has just answered its hello. Later sandboxes of the same
shape restore it with ``-incoming`` instead of booting.

It lives under ``cache_dir()/vm-ready/<key>/`` where ``key`` hashes everything
that must match for a restore to be valid: template digest and base disk
identity, kernel version, initramfs content, QEMU version, accelerator, vCPU
count, memory, disk size, kernel command line and ``FORMAT_VERSION``. Any change
gives a new key: the old entry is simply never used again (it is not deleted
under a sandbox that may still be backed by it — restores hard-link its disk).

``ready.json`` is written last: a directory without it is an unfinished build.
A lock per key makes concurrent first creates build it once. ``prune`` keeps the
cache small: entries whose base disk is gone are dropped, and only the
``KEEP`` most recently used survive (each is ~100 MiB for a 512 MiB guest).
Dropping an entry is always safe: a sandbox restored from it holds a hard link
to its disk, and its memory image is only read at restore time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...paths import cache_dir
from ...osutil import file_lock

#: Bump when the VM layout changes in a way the other key parts do not capture.
FORMAT_VERSION = 1
MEMORY_FILE = "memory.bin"
DISK_FILE = "disk.qcow2"
META_FILE = "ready.json"
KEEP = 6


def ready_root() -> Path:
    path = cache_dir() / "vm-ready"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def ready_key(parts: dict[str, Any]) -> str:
    canonical = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def lookup(key: str) -> Path | None:
    """The complete ready snapshot for ``key``, or None. Marks it used (for ``prune``)."""
    directory = ready_root() / key
    if (directory / META_FILE).is_file() and (directory / MEMORY_FILE).is_file() and (directory / DISK_FILE).is_file():
        try:
            os.utime(directory / META_FILE)
        except OSError:
            pass
        return directory
    return None


def prune(keep: int = KEEP, protect: str = "") -> list[str]:
    """Drop unusable and least recently used ready snapshots; returns the keys removed."""
    root = ready_root()
    entries: list[tuple[float, str]] = []
    removed: list[str] = []
    for directory in root.iterdir():
        if not directory.is_dir():
            continue
        if directory.name.startswith("."):  # an unfinished build: only if it is old (its builder died)
            if time.time() - directory.stat().st_mtime > 3600:
                shutil.rmtree(directory, ignore_errors=True)
            continue
        key = directory.name
        try:
            details = read_details(directory)
            used = (directory / META_FILE).stat().st_mtime
        except (OSError, ValueError):
            details, used = {}, 0.0
        base = Path(str(details.get("base_disk", "")))
        if key != protect and (not details or not base.is_file()):
            if _drop_unlocked(key):
                removed.append(key)
            continue
        entries.append((used, key))
    entries.sort(reverse=True)
    for _, key in entries[keep:]:
        if key != protect and _drop_unlocked(key):
            removed.append(key)
    for lock in root.glob("*.lock"):
        if not (root / lock.stem).exists() and time.time() - lock.stat().st_mtime > 3600:
            lock.unlink(missing_ok=True)
    return removed


def _drop_unlocked(key: str) -> bool:
    """Remove ``key``'s entry unless someone holds its lock (restoring or building it)."""
    lock_path = ready_root() / f"{key}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(ready_root() / key, ignore_errors=True)
        return True
    finally:
        os.close(fd)


@contextmanager
def building(key: str) -> Iterator[None]:
    """Held while a ready snapshot for ``key`` is looked up and, if missing, built."""
    with file_lock(ready_root() / f"{key}.lock"):
        yield


def staging_dir(key: str) -> Path:
    path = ready_root() / f".{key}.{os.getpid()}.{time.monotonic_ns()}"
    path.mkdir(mode=0o700)
    return path


def publish(key: str, staged: Path, parts: dict[str, Any], details: dict[str, Any]) -> Path:
    (staged / META_FILE).write_text(json.dumps({"key": key, "parts": parts, "details": details}, indent=2) + "\n")
    final = ready_root() / key
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    os.rename(staged, final)
    return final


def discard(key: str) -> None:
    """Drop a ready snapshot that failed to restore (so the next create boots cold)."""
    shutil.rmtree(ready_root() / key, ignore_errors=True)


def read_details(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / META_FILE).read_text()).get("details", {}))
