"""Small private-file helpers: 0700 directories, 0600 files, atomic writes, no symlinks."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make sure it is a real 0700 directory (for
    mvm's own state directories)."""
    path = make_dirs(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a directory (refusing to follow a symlink)")
    if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)
    return path


def make_dirs(path: Path) -> Path:
    """Create whatever is missing of ``path`` with mode 0700; leave existing dirs alone
    (for directories the caller chose)."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):  # every directory we create is 0700, parents too
        try:
            directory.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            pass
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _write_temp(tmp: Path, data: bytes) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) atomically: temp file, fsync, rename."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        _write_temp(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_private_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` (0600) only if it does not exist yet; never a half-written file.

    Returns True if this call created it, False if another writer got there first.
    """
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        _write_temp(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_private(path: Path) -> bytes:
    """Read a private file without following a symlink; tighten its mode to 0600 if looser."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_private_for_write(path: Path, *, append: bool = False) -> int:
    """An fd for writing ``path`` (created 0600, no symlink follow)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_TRUNC
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd
