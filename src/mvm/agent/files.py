"""The ``fs.*`` operations: bounded reads, atomic writes, listings, and the rest.

Writes never leave a half-written target behind: ``fs.write`` and
``fs.write_begin``/``chunk``/``end`` write a temporary file beside the target and
rename it into place. Writing to a symlink writes to the file it points to (as a
shell's ``>`` would). Errors carry the protocol's error types with ``path`` set.

Every op but ``fs.sync`` takes ``user``: its permission-relevant step runs as that guest
account (``accounts.open_as``/``run_as``): the open of a read, the creation of a write's
temp file (and parents) after checking an existing target is writable by it (as ``>``
would need), the whole of a stat, listing, mkdir, remove or move. Without it, the
account commands run as by default (``accounts.acting_account``: an OCI image's ``User``,
else the agent's own root) does them.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import secrets
import shutil
import stat
import pwd
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..protocol.codec import CHUNK_SIZE
from .accounts import acting_account, open_as, run_as
from .errors import AgentError, Args, from_os_error, invalid

log = logging.getLogger("mvm.agent")

#: Write handles (``fs.write_begin``) open at once, per agent.
MAX_WRITE_HANDLES = 64
#: Files kept open for a streamed read (``fs.read`` with ``keep_open``), per agent; past
#: it a read is answered without a handle and its next chunks open the file again.
MAX_READ_HANDLES = 64
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
#: Bytes of JSON a single ``fs.list`` page may carry (the header limit is 64 KiB).
LIST_PAGE_BUDGET = 48 * 1024

#: Where an agent that a keeper restarts notes the temp file of each write under way
#: (``PendingTemps``): a tmpfs of the guest's own, gone with the guest.
PENDING_DIR = "/dev/shm/.mvm-agent-writes"
#: ``.<target name>.mvm-<12 hex>.tmp``, beside the target (``_temp_path``).
_TEMP_NAME = re.compile(r"\..{1,200}\.mvm-(?P<token>[0-9a-f]{12})\.tmp", re.DOTALL)


def _temp_path(target: str) -> str:
    """A fresh temp file name beside ``target``."""
    directory, name = os.path.split(target)
    return os.path.join(directory or "/", f".{name[:200]}.mvm-{secrets.token_hex(6)}.tmp")


class PendingTemps:
    """The temp files of the writes under way, one small file each in ``PENDING_DIR``,
    so that when the agent dies mid-write (SIGKILL: nothing of it runs after), the next
    agent its keeper starts removes them (``clean``) instead of leaving
    ``.NAME.mvm-<hex>.tmp`` beside the target for ever. Off (a no-op) for an agent no
    keeper restarts: several of those may share a host's ``/dev/shm`` (tests). Best
    effort: a note that cannot be written costs only the cleanup."""

    def __init__(self) -> None:
        self._directory: str | None = None

    def enable(self, directory: str = PENDING_DIR) -> int:
        """Use ``directory`` (made 0700, and only if it is ours): first remove the temp
        files a dead agent noted there. Returns how many were removed."""
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            st = os.lstat(directory)
        except OSError as exc:
            log.warning("no record of writes under way (%s): %s", directory, exc)
            return 0
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            log.warning("no record of writes under way: %s is not a private directory of this agent", directory)
            return 0
        self._directory = directory
        return self._clean()

    def add(self, temp: str) -> None:
        entry = self._entry(temp)
        if entry is None:
            return
        try:
            fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, os.fsencode(temp))
            finally:
                os.close(fd)
        except OSError:
            pass

    def remove(self, temp: str) -> None:
        entry = self._entry(temp)
        if entry is not None:
            try:
                os.unlink(entry)
            except OSError:
                pass

    def _entry(self, temp: str) -> str | None:
        match = _TEMP_NAME.fullmatch(os.path.basename(temp))
        if self._directory is None or match is None:
            return None
        return os.path.join(self._directory, match["token"])

    def _clean(self) -> int:
        assert self._directory is not None
        removed = 0
        for token in os.listdir(self._directory):
            entry = os.path.join(self._directory, token)
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    temp = os.fsdecode(os.read(fd, 4096))
                finally:
                    os.close(fd)
                os.unlink(entry)
            except OSError:
                continue
            match = _TEMP_NAME.fullmatch(os.path.basename(temp))
            if not os.path.isabs(temp) or match is None or match["token"] != token:
                continue  # not a note of ours: never a reason to remove anything
            try:
                if stat.S_ISDIR(os.lstat(temp).st_mode):  # a cut move's copy of a directory
                    shutil.rmtree(temp)  # (never follows a link: fd-based on Linux)
                else:  # a write's file, a move's file or symbolic link
                    os.unlink(temp)
                removed += 1
            except OSError:
                pass
        if removed:
            log.info("removed %d temp file(s) of writes a dead agent left", removed)
        return removed


#: This agent process's record of its writes under way.
PENDING = PendingTemps()


def file_entry(path: str) -> dict[str, Any]:
    """``FileEntry`` for ``path`` (lstat: a symlink is reported as itself)."""
    st = os.lstat(path)
    kind = _kind(st.st_mode)
    entry: dict[str, Any] = {
        "name": os.path.basename(path) or "/",
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
    }
    if kind == "symlink":
        entry["symlink_target"] = os.readlink(path)
    return entry


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """Write all of ``data`` at the file position, or at ``offset`` (``pwrite``)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written


def _target_of(path: str) -> str:
    """Where a write to ``path`` lands: the file a symlink points to, else ``path``."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _check_parent(path: str, target: str, make_parents: bool, who: pwd.struct_passwd | None) -> None:
    parent = os.path.dirname(target) or "/"
    if make_parents and not os.path.isdir(parent):  # an existing parent: no fork to make it as ``who``
        try:
            run_as(who, lambda: os.makedirs(parent, DEFAULT_DIR_MODE, exist_ok=True))
        except FileExistsError:
            raise AgentError("NotADirectory", f"a parent of {path} is not a directory", path=path) from None
        except OSError as exc:
            raise from_os_error(exc, path) from None
        return
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise AgentError("FileNotFound", f"parent directory {parent} does not exist (use make_parents)",
                         path=path) from None
    except OSError as exc:
        raise from_os_error(exc, path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError("NotADirectory", f"parent {parent} of {path} is not a directory", path=path)


def _existing(target: str, path: str) -> os.stat_result | None:
    """The stat of an existing target (refusing directories), or None."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise from_os_error(exc, path) from None
    if stat.S_ISDIR(st.st_mode):
        raise AgentError("IsADirectory", f"{path} is a directory", path=path)
    return st


def _open_temp(target: str, path: str, who: pwd.struct_passwd | None, existing: bool) -> tuple[int, str]:
    """A fresh 0600 temp file in the target's directory (created by ``who``, who must
    also be able to write an ``existing`` target)."""
    if existing and who is not None:
        try:
            run_as(who, lambda: _check_writable(target))
        except OSError as exc:
            raise from_os_error(exc, path) from None
    for _ in range(16):
        temp = _temp_path(target)
        try:
            fd = open_as(who, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise from_os_error(exc, path) from None
        PENDING.add(temp)
        return fd, temp
    raise AgentError("Internal", f"could not create a temporary file beside {path}", path=path)


def _check_writable(target: str) -> None:
    """Whether this process may write ``target`` (run as the user: ``access`` checks the real uid)."""
    if not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)


def _discard(fd: int | None, temp: str) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(temp)
    except OSError:
        pass
    PENDING.remove(temp)


def _finish_temp(fd: int, temp: str, target: str, path: str, mode: int, owner: tuple[int, int] | None) -> None:
    """Give the temp file its final mode (and the old file's owner), rename it over the target."""
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            try:
                os.fchown(fd, *owner)
            except OSError:
                pass
        os.close(fd)
        fd = -1
        os.replace(temp, target)
    except OSError as exc:
        _discard(fd if fd >= 0 else None, temp)
        raise from_os_error(exc, path) from None
    PENDING.remove(temp)


_thread_buffers = threading.local()


def _read_buffer() -> memoryview:
    """This thread's ``CHUNK_SIZE`` read buffer: reused, so a read touches no fresh memory."""
    buffer = getattr(_thread_buffers, "read", None)
    if buffer is None:
        buffer = _thread_buffers.read = memoryview(bytearray(CHUNK_SIZE))
    return buffer


def _read_chunk(fd: int, path: str, offset: int, length: int) -> tuple[dict[str, Any], memoryview]:
    """``length`` bytes at ``offset`` of an open file (``fs.read``), with ``{size, eof}``."""
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise AgentError("IsADirectory", f"{path} is a directory (use fs.list)", path=path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise invalid("path", f"{path} is not a regular file")
        view = _read_buffer()[:length]
        try:
            count = os.preadv(fd, [view], offset)
        except OSError as exc:
            if exc.errno != errno.ESPIPE or offset:  # an unseekable device: read it from its start
                raise
            count = os.readv(fd, [view])
        data = view[:count]
    except OSError as exc:
        raise from_os_error(exc, path) from None
    # A short read is the end; so is reaching st_size -- unless that is 0, as for /proc files.
    known_size = stat.S_ISREG(st.st_mode) and st.st_size > 0
    eof = (length > 0 and len(data) < length) or (known_size and offset + len(data) >= st.st_size)
    return {"size": st.st_size, "eof": eof}, data


def _list_page(path: str, offset: int) -> dict[str, Any]:
    """One page of ``fs.list`` (see ``Files.list``)."""
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise AgentError("NotADirectory", f"{path} is not a directory", path=path)
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise from_os_error(exc, path) from None
    entries: list[dict[str, Any]] = []
    used = 0
    position = offset
    for name in names[offset:]:
        try:
            entry = file_entry(os.path.join(path, name))
        except OSError:
            position += 1  # vanished since listdir
            continue
        cost = len(json.dumps(entry)) + 1  # ensure_ascii: an upper bound on the wire size
        if entries and used + cost > LIST_PAGE_BUDGET:
            break
        entries.append(entry)
        used += cost
        position += 1
    result: dict[str, Any] = {"entries": entries, "total": len(names)}
    if position < len(names):
        result["truncated"] = True
        result["next_offset"] = position
    return result


@dataclass
class _WriteHandle:
    path: str
    target: str
    temp: str
    fd: int
    mode: int
    owner: tuple[int, int] | None
    size: int = 0
    lock: threading.Lock = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.lock = threading.Lock()


class _ReadHandle:
    """A file kept open across the chunks of one streamed read: opened once (as the
    acting user: one child forked per read, not per chunk), closed by ``fs.read_close``
    once no chunk read of it is running."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self._fd = fd
        self._readers = 0
        self._closing = False
        self._lock = threading.Lock()

    def enter(self) -> int:
        with self._lock:
            if self._closing:
                raise invalid("handle", "this read handle is already closed")
            self._readers += 1
            return self._fd

    def leave(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._closing and not self._readers:
                os.close(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if not self._readers:
                os.close(self._fd)


class Files:
    """Handlers for every ``fs.*`` op; holds the open write and read handles."""

    def __init__(self, default_user: str | None = None) -> None:
        self._default_user = default_user  # an OCI image's User, as for commands
        self._handles: dict[int, _WriteHandle] = {}
        self._readers: dict[int, _ReadHandle] = {}
        self._lock = threading.Lock()
        self._ids: Iterator[int] | None = None  # (drawn at the first handle: see _new_handle)

    def _new_handle(self) -> int:
        """A handle number (under ``self._lock``). The numbers of one agent process start at a
        random point: a restarted agent's handles never name a dead agent's, so a chunk the
        host sent to the dead agent's write that arrives after the restart finds no handle
        instead of landing in a new write. Drawn at the first handle, not at start: a VM's
        agent starts before the guest's random pool may be ready."""
        if self._ids is None:
            self._ids = itertools.count(secrets.randbits(48) + 1)
        return next(self._ids)

    def _user(self, args: Args) -> pwd.struct_passwd | None:
        """The account an op acts as (``None``: the agent itself)."""
        return acting_account(args, self._default_user)

    # -- reading --------------------------------------------------------------

    def read(self, args: Args) -> tuple[dict[str, Any], memoryview]:
        """One chunk of a file, by ``path`` or by the ``handle`` an earlier chunk's answer
        gave (``keep_open``: the file stays open for the next chunks while it has more).
        The bytes are a view of this worker thread's read buffer: valid until the
        thread's next read, i.e. until its answer was sent."""
        offset = args.integer("offset", 0, minimum=0)
        length = args.integer("length", CHUNK_SIZE, minimum=0, maximum=CHUNK_SIZE)
        assert offset is not None and length is not None
        handle_id = args.integer("handle")
        if handle_id is not None:
            with self._lock:
                handle = self._readers.get(handle_id)
            if handle is None:
                raise invalid("handle", f"no open read handle {handle_id} (closed, or dropped when the host "
                              "reconnected)")
            fd = handle.enter()
            try:
                return _read_chunk(fd, handle.path, offset, length)
            finally:
                handle.leave()
        path = args.path()
        keep_open = args.boolean("keep_open")
        who = self._user(args)
        try:
            fd = open_as(who, path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise from_os_error(exc, path) from None
        kept = False
        try:
            result, data = _read_chunk(fd, path, offset, length)
            if keep_open and not result["eof"]:
                with self._lock:
                    if len(self._readers) < MAX_READ_HANDLES:
                        result["handle"] = self._new_handle()
                        self._readers[result["handle"]] = _ReadHandle(path, fd)
                        kept = True
            return result, data
        finally:
            if not kept:
                os.close(fd)

    def read_close(self, args: Args) -> dict[str, Any]:
        """Close a read handle (chunk reads of it still running finish first)."""
        handle_id = args.integer("handle", required=True)
        with self._lock:
            handle = self._readers.pop(handle_id, None)
        if handle is not None:
            handle.close()
        return {"closed": handle is not None}

    def stat(self, args: Args) -> dict[str, Any]:
        path = args.path()
        who = self._user(args)
        try:
            return run_as(who, lambda: file_entry(path))
        except OSError as exc:
            raise from_os_error(exc, path) from None

    def list(self, args: Args) -> dict[str, Any]:
        """One page of a directory listing, sorted by name; ``next_offset`` when more remain."""
        path = args.path()
        offset = args.integer("offset", 0, minimum=0)
        assert offset is not None
        return run_as(self._user(args), lambda: _list_page(path, offset))

    # -- writing --------------------------------------------------------------

    def write(self, args: Args, payload: bytes) -> dict[str, Any]:
        path = args.path()
        mode = args.mode()
        make_parents = args.boolean("make_parents")
        append = args.boolean("append")
        who = self._user(args)
        target = _target_of(path)
        _check_parent(path, target, make_parents, who)
        existing = _existing(target, path)
        if append:
            return {"size": self._append(path, target, payload, mode, existing, who)}
        final_mode = mode if mode is not None else (
            stat.S_IMODE(existing.st_mode) if existing is not None else DEFAULT_FILE_MODE)
        owner = (existing.st_uid, existing.st_gid) if existing is not None else None
        fd, temp = _open_temp(target, path, who, existing is not None)
        try:
            _write_all(fd, payload)
        except OSError as exc:
            _discard(fd, temp)
            raise from_os_error(exc, path) from None
        _finish_temp(fd, temp, target, path, final_mode, owner)
        return {"size": len(payload)}

    def _append(self, path: str, target: str, payload: bytes, mode: int | None,
                existing: os.stat_result | None, who: pwd.struct_passwd | None) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = open_as(who, target, flags, 0o600)
        except OSError as exc:
            raise from_os_error(exc, path) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise invalid("path", f"{path} is not a regular file; append needs one")
            if existing is None or mode is not None:
                os.fchmod(fd, mode if mode is not None else DEFAULT_FILE_MODE)
            _write_all(fd, payload)
            return os.fstat(fd).st_size
        except OSError as exc:
            raise from_os_error(exc, path) from None
        finally:
            os.close(fd)

    def write_begin(self, args: Args) -> dict[str, Any]:
        path = args.path()
        mode = args.mode()
        make_parents = args.boolean("make_parents")
        who = self._user(args)
        target = _target_of(path)
        _check_parent(path, target, make_parents, who)
        existing = _existing(target, path)
        final_mode = mode if mode is not None else (
            stat.S_IMODE(existing.st_mode) if existing is not None else DEFAULT_FILE_MODE)
        owner = (existing.st_uid, existing.st_gid) if existing is not None else None
        with self._lock:
            if len(self._handles) >= MAX_WRITE_HANDLES:
                raise AgentError("InvalidState", f"too many open write handles (at most {MAX_WRITE_HANDLES}); "
                                 "finish or abort some with fs.write_end", path=path)
            fd, temp = _open_temp(target, path, who, existing is not None)
            handle = self._new_handle()
            self._handles[handle] = _WriteHandle(path, target, temp, fd, final_mode, owner)
        return {"handle": handle}

    def _take(self, args: Args, *, remove: bool) -> _WriteHandle:
        handle = args.integer("handle", required=True)
        with self._lock:
            found = self._handles.pop(handle, None) if remove else self._handles.get(handle)
        if found is None:
            raise invalid("handle", f"no open write handle {handle} (finished, aborted, or dropped when the "
                          "host reconnected)")
        return found

    def write_chunk(self, args: Args, payload: bytes) -> dict[str, Any]:
        """Append ``payload``, or put it at ``offset``: a client that keeps several chunks
        in flight names where each goes, as they may reach the agent in any order (the
        supervisor serves each request on a thread of its own)."""
        offset = args.integer("offset", minimum=0)
        handle = self._take(args, remove=False)
        with handle.lock:
            if handle.fd < 0:
                raise invalid("handle", "this write handle is already finished")
            try:
                _write_all(handle.fd, payload, offset)
            except OSError as exc:
                raise from_os_error(exc, handle.path) from None
            handle.size += len(payload)
            return {"size": handle.size}

    def write_end(self, args: Args) -> dict[str, Any]:
        commit = args.boolean("commit", True)
        handle = self._take(args, remove=True)
        with handle.lock:
            fd, handle.fd = handle.fd, -1
            if fd < 0:
                raise invalid("handle", "this write handle is already finished")
            if not commit:
                _discard(fd, handle.temp)
                return {"size": 0, "committed": False}
            _finish_temp(fd, handle.temp, handle.target, handle.path, handle.mode, handle.owner)
            return {"size": handle.size, "committed": True}

    def discard_handles(self) -> None:
        """Abort every open write handle and close every read handle (the host
        reconnected: they belonged to the old connection)."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            readers = list(self._readers.values())
            self._readers.clear()
        for reader in readers:
            reader.close()
        for handle in handles:
            with handle.lock:
                fd, handle.fd = handle.fd, -1
                if fd >= 0:
                    _discard(fd, handle.temp)

    def sync(self) -> dict[str, Any]:
        """Flush the guest's page cache to its disk (the supervisor asks before a stop or a snapshot)."""
        os.sync()
        return {}

    # -- directories and names --------------------------------------------------

    def mkdir(self, args: Args) -> dict[str, Any]:
        path = args.path()
        parents = args.boolean("parents")
        mode = args.mode()
        return run_as(self._user(args), lambda: self._mkdir(path, parents, mode))

    def _mkdir(self, path: str, parents: bool, mode: int | None) -> dict[str, Any]:
        try:
            if parents:
                if os.path.isdir(path):  # like mkdir -p (a symlink to a directory counts)
                    return {}
                os.makedirs(path, DEFAULT_DIR_MODE)
            else:
                os.mkdir(path, DEFAULT_DIR_MODE)
            if mode is not None:
                os.chmod(path, mode)
        except FileExistsError:
            raise AgentError("FileExists", f"{path} already exists", path=path) from None
        except OSError as exc:
            raise from_os_error(exc, path) from None
        return {}

    def remove(self, args: Args) -> dict[str, Any]:
        path = args.path()
        recursive = args.boolean("recursive")
        if path == "/":
            raise invalid("path", "refusing to remove the root directory")
        return run_as(self._user(args), lambda: self._remove(path, recursive))

    def _remove(self, path: str, recursive: bool) -> dict[str, Any]:
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(path)
            elif recursive:
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise AgentError("DirectoryNotEmpty", f"{path} is not empty (use recursive)", path=path) from None
            raise from_os_error(exc, path if exc.filename in (None, path) else exc.filename) from None
        return {}

    def move(self, args: Args) -> dict[str, Any]:
        src = args.path("src")
        dst = args.path("dst")
        overwrite = args.boolean("overwrite")
        # A move across file systems copies to this temp first. It is noted here, by the
        # agent, not where the copy runs: a move acting as a user runs in a child of that
        # user, which cannot write the agent's notes.
        temp = _temp_path(dst)
        PENDING.add(temp)
        try:
            return run_as(self._user(args), lambda: self._move(src, dst, overwrite, temp))
        finally:
            PENDING.remove(temp)

    def _move(self, src: str, dst: str, overwrite: bool, temp: str) -> dict[str, Any]:
        try:
            os.lstat(src)
        except OSError as exc:
            raise from_os_error(exc, src) from None
        if src == dst:
            return {}
        if os.path.lexists(dst) and not overwrite:
            raise AgentError("FileExists", f"{dst} already exists (use overwrite)", path=dst)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno == errno.EXDEV:  # another file system (or an overlay directory)
                self._copy_move(src, dst, temp)
                return {}
            blame = dst if exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY) else src
            if exc.errno == errno.ENOENT and os.path.lexists(src):
                blame = dst
            raise from_os_error(exc, blame) from None
        return {}

    def _copy_move(self, src: str, dst: str, temp: str) -> None:
        """Move across file systems: copy to ``temp`` beside ``dst``, rename it into place,
        delete ``src``."""
        try:
            if os.path.islink(src):
                os.symlink(os.readlink(src), temp)
            elif os.path.isdir(src):
                shutil.copytree(src, temp, symlinks=True)
            else:
                shutil.copy2(src, temp, follow_symlinks=False)
            os.replace(temp, dst)
        except OSError as exc:
            if os.path.isdir(temp) and not os.path.islink(temp):
                shutil.rmtree(temp, ignore_errors=True)
            else:
                _discard(None, temp)
            raise from_os_error(exc, dst) from None
        try:
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.rmtree(src)
            else:
                os.unlink(src)
        except OSError as exc:
            raise from_os_error(exc, src) from None
