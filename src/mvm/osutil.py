"""Host OS helpers every layer shares (stdlib only, imports nothing of mvm, so security,
backends and the supervisor may all use it): private files (0700 directories, 0600 files,
no symlinks followed), atomic writes (one for bytes, one for JSON), an exclusive file
lock, a background fsync for files written without one, whether a process is alive
(by pid, or by pid and start time: a *stamp*, which a reused pid does not match), and how a
child process ended, in words."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import queue
import signal
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def _temp_beside(path: Path) -> str:
    # (string operations: every receipt is written through here, and pathlib's parsing
    # cost more than the write)
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _write_temp(tmp: str, data: bytes, durable: bool = True) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_private_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` (mode 0600) atomically: temp file beside it, rename over it.
    A reader sees the old or the new content, never a mix. ``durable``: fsync the file and
    its directory too (keys, manifests, receipts), not needed for a record a running
    process rewrites (``state.json``, ``backend.json``)."""
    tmp = _temp_beside(path)
    try:
        _write_temp(tmp, data, durable)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(Path(path).parent)


class DeferredSync:
    """Makes files written with ``durable=False`` durable off the caller's path: a thread
    of its own fsyncs the files added, then the directories holding them, in batches at
    most every ``interval`` seconds (an fsync commits the file system's journal, which
    stalls concurrent creates: one commit per batch, not per file). A file added is already
    complete and visible (renamed into place); only its survival of a host crash waits, for
    at most ``interval`` plus the fsyncs. :meth:`flush` waits for all of it."""

    def __init__(self, name: str, interval: float = 0.05):
        self._queue: queue.Queue[Path] = queue.Queue()
        self._name = name
        self._interval = interval
        self._flushing = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def add(self, path: Path) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put(path)

    def flush(self) -> None:
        """Return once every file added so far (and its directory) is fsynced."""
        self._flushing.set()
        self._queue.join()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            # wait out the window (cut short by flush), taking what arrives meanwhile
            self._flushing.wait(self._interval)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                for path in batch:
                    _fsync_path(path)
                for directory in {path.parent for path in batch}:
                    _fsync_path(directory)
            finally:
                for _ in batch:
                    self._queue.task_done()


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:  # removed meanwhile (its sandbox destroyed): nothing to keep
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any], *, durable: bool = False) -> None:
    """``data`` as JSON (indented, keys sorted) by :func:`write_private_atomic`."""
    write_private_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n", durable=durable)


def create_private_exclusive(path: Path, data: bytes, *, durable: bool = True) -> bool:
    """Create ``path`` with ``data`` (0600) only if it does not exist yet; never a half-written file.

    Returns True if this call created it, False if another writer got there first.
    ``durable=False`` skips the fsyncs (for a claim that need not outlive the host).
    """
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        _write_temp(tmp, data, durable)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        if durable:
            fsync_dir(path.parent)
        return True
    finally:
        _unlink_quietly(tmp)


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


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists and is not a zombie (also when it is another user's)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks since boot), or None if it is gone
    or a zombie. With the pid it names one process for good: pids are reused, this pair is not."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return None if fields[0] == "Z" else int(fields[19])
    except (IndexError, ValueError):
        return None


def process_stamp(pid: int | None = None) -> str:
    """``"PID START"`` of process ``pid`` (default: this one), checked by :func:`stamp_alive`."""
    pid = os.getpid() if pid is None else pid
    return f"{pid} {process_start_time(pid)}"


def stamp_pid(stamp: str | None) -> int | None:
    """The pid of a :func:`process_stamp`, None if ``stamp`` is not one."""
    try:
        pid, start = (stamp or "").split()
        int(start)
        return int(pid) if int(pid) > 0 else None
    except ValueError:
        return None


def process_is(pid: Any, start_ticks: Any) -> bool:
    """Whether the process that was ``pid`` when it had started at ``start_ticks`` still
    runs (not a zombie, and not another process that got its pid since)."""
    return isinstance(pid, int) and pid > 0 and start_ticks is not None and process_start_time(pid) == start_ticks


def stamp_alive(stamp: str | None) -> bool:
    """Whether the process a :func:`process_stamp` names still runs."""
    pid = stamp_pid(stamp)
    return pid is not None and process_is(pid, int((stamp or "").split()[1]))


def signal_name(signum: int) -> str:
    """``"SIGKILL"`` for 9: the name a user looks up; ``"signal 99"`` for a number no signal has."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_description(returncode: int) -> str:
    """How a child process ended, from its ``subprocess`` return code (N: it exited with
    status N; -N: signal N killed it): ``"exited with status 1"``, ``"was killed by SIGKILL"``.
    Follows the program's name: ``f"mke2fs {exit_description(code)}"``."""
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}"
    return f"exited with status {returncode}"
