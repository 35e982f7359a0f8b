"""The on-disk cache of built templates: naming, locks, safe removal.

Layout of ``templates_dir()`` (``$MVM_TEMPLATES`` or ``$MVM_HOME/templates``)::

    <name>-<digest[:16]>/        a complete build (renamed into place atomically)
        rootfs/                  the root directory; never written by a sandbox
        manifest.json            what was built (written before the rename)
        recipe.json              the recipe, so a custom template can be rebuilt by name
        build.log                mmdebstrap's output
        rootfs.ext4              the VM backend's read-only disk image (made on demand)
    .tmp-<name>-<digest16>+XXXX/ a build in progress (or debris from a crashed one)
    .trash-…                     a template being removed
    .locks/<key>.lock            fcntl.flock locks: one build of a key at a time
    .locks/<key>.use             shared flocks of the processes using a build (``hold_use``)

A directory without the ``.`` prefix is always complete: builds happen beside it and
are renamed into place, so readers never need a lock. Removing one is exclusive with
using it: a create resolving and booting from a build, a sandbox's supervisor for its
whole life, a build copying from an older one hold it shared (``hold_use``); a prune or
removal discards it only under an exclusive hold it got without waiting
(``discard_unless_used``), so checkouts sharing one cache never pull a build from under
each other.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import TemplateBuildError
from ..paths import templates_dir

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
STALE_AFTER_SECONDS = 3600


def template_key(name: str, digest: str) -> str:
    """The directory name of one build: ``<name>-<digest[:16]>``."""
    return f"{name}-{digest[:16]}"


@contextmanager
def build_lock(key: str, *, on_wait: str = "", report: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of ``key`` (blocks while another process holds it).

    ``report`` (a callable taking a string) is told ``on_wait`` if the lock is busy.
    """
    lock_dir = templates_dir() / ".locks"
    lock_dir.mkdir(exist_ok=True)
    fd = os.open(lock_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if report is not None and on_wait:
                report(on_wait)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _use_lock(key: str) -> int:
    lock_dir = templates_dir() / ".locks"
    lock_dir.mkdir(exist_ok=True)
    return os.open(lock_dir / f"{key}.use", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def hold_use(key: str) -> int:
    """Hold build ``key`` in use until the returned fd is closed (or this process ends):
    no prune or removal discards it meanwhile. Waits only while one is discarding it --
    the caller then finds it gone (``builder.hold_template`` builds it again)."""
    fd = _use_lock(key)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def unused(key: str) -> Iterator[bool]:
    """An exclusive hold on build ``key`` if no process holds it in use: yields True
    (and holds it until the end of the ``with``), else False at once."""
    fd = _use_lock(key)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def held(key: str) -> bool:
    """Whether some process holds build ``key`` in use (``hold_use``) right now."""
    with unused(key) as free:
        return not free


def discard_unless_used(entry: Path) -> bool:
    """Discard the build ``entry`` unless something uses it: a process holding it
    (``hold_use``), a mount or an open file inside it (``in_use``). Under its build lock
    and an exclusive use hold, so no create starts using it while it goes. True if removed."""
    with build_lock(entry.name), unused(entry.name) as free:
        if not free or not os.path.lexists(entry) or in_use(entry):
            return False
        discard(entry)
        return True


def lock_is_free(key: str) -> bool:
    """True when no process holds ``key``'s lock (so its temp dirs are debris)."""
    path = templates_dir() / ".locks" / f"{key}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def make_temp_dir(key: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}+", dir=templates_dir()))
    path.chmod(0o755)
    return path


def clean_stale(own_key: str | None = None) -> list[Path]:
    """Remove debris of crashed builds and removals; returns what was removed.

    A ``.tmp-<key>+…`` directory is removed when it belongs to ``own_key`` (whose lock
    the caller holds, so no build of it is running), or when nobody holds its key's
    lock and it is older than an hour. ``.trash-…`` directories are always removed.
    """
    removed: list[Path] = []
    now = time.time()
    for entry in templates_dir().iterdir():
        name = entry.name
        if name.startswith(TRASH_PREFIX):
            pass
        elif name.startswith(TMP_PREFIX) and "+" in name:
            key = name[len(TMP_PREFIX):].split("+", 1)[0]
            if key != own_key:
                try:
                    age = now - entry.lstat().st_mtime
                except FileNotFoundError:
                    continue
                if age < STALE_AFTER_SECONDS or not lock_is_free(key):
                    continue
        else:
            continue
        remove_tree(entry)
        removed.append(entry)
    return removed


def discard(directory: Path) -> None:
    """Remove a complete template directory: rename it out of sight first, then delete."""
    trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{directory.name}+", dir=directory.parent))
    os.rename(directory, trash / directory.name)
    remove_tree(trash)


def remove_tree(path: Path) -> None:
    """``rm -rf`` that never leaves the tree's filesystem.

    A build killed mid-way can leave mmdebstrap's /proc, /sys and /dev mounts inside
    its root: those are unmounted first, and ``--one-file-system`` keeps ``rm`` out of
    anything still mounted.
    """
    if not os.path.lexists(path):
        return
    for mount_point in mounts_under(path):
        subprocess.run([host_tool("umount"), "--lazy", mount_point], capture_output=True, check=False)
    if path.is_dir() and not path.is_symlink():
        result = subprocess.run([host_tool("rm"), "-rf", "--one-file-system", "--", str(path)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0 and os.path.lexists(path):
            raise TemplateBuildError(f"could not remove {path}: {result.stderr.strip()}", path=str(path))
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def remove_builds(name: str, builds: list[Path], *, force: bool = False) -> int:
    """Discard the template builds ``builds`` of ``name``, each under its build lock;
    ``InvalidState`` (removing nothing) when one is in use by a sandbox, unless ``force``."""
    from ..errors import InvalidState

    busy = [] if force else [e.name for e in builds if held(e.name) or in_use(e)]
    if busy:
        raise InvalidState(f"template {name}: {', '.join(busy)} in use by a sandbox; destroy it first "
                           "(or force=True)", template=name, in_use=busy)
    removed = 0
    for entry in builds:
        if not force:
            removed += discard_unless_used(entry)
            continue
        with build_lock(entry.name):
            if os.path.lexists(entry):
                discard(entry)
                removed += 1
    return removed


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            for line in mountinfo:
                fields = line.split(" ")
                if len(fields) > 4:
                    point = _unescape(fields[4])
                    if point == prefix or point.startswith(prefix + "/"):
                        found.append(point)
    except OSError:
        return []
    return sorted(found, key=len, reverse=True)


def in_use(directory: Path) -> bool:
    """Whether anything on this host uses a template directory: a mount that names it (an
    overlay's ``lowerdir``, a bind mount) or a process with a file or mapping open inside
    it (QEMU's disk, fuse-overlayfs's lower layer). Best effort: processes of other users
    are only visible to root."""
    prefix = os.path.realpath(directory)
    inside = (prefix + "/", prefix)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            if any(prefix in _unescape(line) for line in mountinfo):
                return True
    except OSError:
        pass
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in os.scandir(proc / "fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target == prefix or target.startswith(inside[0]):
                    return True
            with open(proc / "maps", encoding="utf-8", errors="replace") as maps:
                if any(inside[0] in line for line in maps):
                    return True
        except OSError:
            continue
    return False


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 4 <= len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def host_tool(name: str) -> str:
    """A host tool by absolute path: /usr/sbin is not on every user's PATH."""
    for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.access(f"{directory}/{name}", os.X_OK):
            return f"{directory}/{name}"
    found = shutil.which(name)
    if found is None:
        raise TemplateBuildError(f"{name} is not installed on this host")
    return found


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, number of inodes) of a tree, hard links counted once, like ``du``."""
    seen: set[tuple[int, int]] = set()
    total = 0
    count = 0
    stack = [str(root)]
    while stack:
        current = stack.pop()
        try:
            it = os.scandir(current)
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                ident = (st.st_dev, st.st_ino)
                if ident in seen:
                    continue
                seen.add(ident)
                count += 1
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return total, count + 1


def copy_tree(source: Path, dest: Path) -> None:
    """A full copy (``cp -a --reflink=auto``): never hard links, sandboxes must not share inodes."""
    result = subprocess.run([host_tool("cp"), "-a", "--reflink=auto", "--", str(source), str(dest)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise TemplateBuildError(f"copying {source} failed: {result.stderr.strip()[-2000:]}")

