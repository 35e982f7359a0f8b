"""The sandbox's root file system: a writable layer over the read-only template.

Four ways, best first (``kind`` is what ``describe()["root"]`` reports):

``overlay-image`` (host root, loop devices)
    The overlay's upper and work directories live on an ext4 image of ``rootfs_size_mb``
    (a sparse file in the sandbox's directory, on a loop device: ``diskimage``), so
    writes past the size fail with ENOSPC, and the disk is disk: its file data is page
    cache the kernel writes back and reclaims, never memory the sandbox could be
    out-of-memory killed for. When the kernel supports idmapped mounts, the template is
    first bind-mounted *idmapped* (host uid k appears as ``uid_base + k``) and that mount
    is the overlay's lower layer: the sandbox's root then owns its files while being an
    unprivileged host uid (see ``IdMap``). The template itself is never written:
    overlayfs copies a file up before changing it.
``overlay-tmpfs`` (host root, no loop devices)
    The same with a tmpfs of ``rootfs_size_mb`` instead of the image: RAM, charged to the
    sandbox's memory cgroup, so a disk filled past ``memory_mb`` ends in an out-of-memory
    kill before ENOSPC.
``fuse-overlayfs`` (no root, the binary is installed)
    The same layering in user space; the upper directory lives on disk under the
    sandbox's state directory, so ``rootfs_size_mb`` is not enforced.
``copy`` (no root, no fuse-overlayfs)
    A private copy of the template tree; also without a size limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import SandboxError
from . import diskimage

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOATIME = 0x400
MNT_DETACH = 0x2
CLONE_NEWUSER = 0x10000000

# new mount API (x86_64 syscall numbers, include/uapi/linux/mount.h)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

#: Host uids handed to sandboxes: blocks of 65536 in [0x70000000, 0x7FFE0000), clear of
#: /etc/subuid's usual 100000+ ranges and of systemd's container range (0x80000-0x6FFFFFFF).
UID_RANGE_START = 0x70000000
UID_BLOCK = 65536
UID_BLOCKS = (0x7FFE0000 - UID_RANGE_START) // UID_BLOCK


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


# ---- mounts -------------------------------------------------------------------


def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode() if data else None),
        f"mount {fstype} on {target}",
    )


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_points() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            out.append(_unescape(line.split()[4]))
    return out


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below ``prefix``, deepest first."""
    base = str(prefix).rstrip("/")
    found = [m for m in mount_points() if m == base or m.startswith(base + "/")]
    return sorted(set(found), key=lambda m: (-m.count("/"), m))


def unmount(path: Path | str) -> None:
    """Unmount every mount stacked on ``path``; lazy (MNT_DETACH) when busy. Idempotent."""
    target = str(path)
    for _ in range(16):
        if target not in mount_points():
            return
        if _libc.umount2(target.encode(), 0) == 0:
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT) and target not in mount_points():
            return
        if _libc.umount2(target.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                raise OSError(err, f"umount {target}: {os.strerror(err)}")
    if target in mount_points():
        raise OSError(errno.EBUSY, f"umount {target}: still mounted")


# ---- user namespace with a full uid map, idmapped mounts ------------------------


@dataclass(frozen=True)
class IdMap:
    """Sandbox uids/gids ``0..count-1`` are host ``base..base+count-1``."""

    base: int
    count: int = UID_BLOCK

    @classmethod
    def for_sandbox(cls, sandbox_id: str) -> IdMap:
        block = zlib.crc32(sandbox_id.encode()) % UID_BLOCKS
        return cls(UID_RANGE_START + block * UID_BLOCK)

    def contains(self, host_id: int) -> bool:
        return self.base <= host_id < self.base + self.count

    def record(self) -> dict[str, Any]:
        return {"sandbox_uid": 0, "host_uid": self.base, "count": self.count}


def make_userns(idmap: IdMap) -> int:
    """A user namespace owned by host uid ``idmap.base`` with the full map written; returns
    an fd to it (``bwrap --userns FD``). Owned by that uid so that bwrap, running as it, may
    join the namespace with all capabilities *inside* it and none outside."""

    def become_owner() -> None:
        os.setgroups([])
        os.setgid(idmap.base)
        os.setuid(idmap.base)
        if _libc.unshare(CLONE_NEWUSER) != 0:
            os._exit(111)

    # Popen returns once the child exec'd, i.e. after unshare() in the pre-exec hook.
    holder = subprocess.Popen(
        ["sleep", "60"], preexec_fn=become_owner, stdin=subprocess.DEVNULL, close_fds=True, cwd="/"
    )
    try:
        mapping = f"0 {idmap.base} {idmap.count}\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as handle:
                handle.write(mapping)
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        holder.kill()
        holder.wait()


class IdmapUnsupported(OSError):
    """The kernel or the template's file system cannot make an idmapped mount."""


def idmapped_bind(source: Path, target: Path, userns_fd: int) -> None:
    """Attach at ``target`` a read-only, nodev, nosuid clone of ``source`` whose owners are
    shifted through ``userns_fd``'s map."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, str(source).encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
            raise IdmapUnsupported(err, f"open_tree {source}: {os.strerror(err)}")
        raise OSError(err, f"open_tree {source}: {os.strerror(err)}")
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID, 0, 0, userns_fd)
        if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
            err = ctypes.get_errno()
            raise IdmapUnsupported(err, f"mount_setattr(MOUNT_ATTR_IDMAP) on {source}: {os.strerror(err)}")
        _check(
            _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, str(target).encode(), MOVE_MOUNT_F_EMPTY_PATH),
            f"move_mount to {target}",
        )
    finally:
        os.close(fd)


_IDMAP_PROBE: tuple[bool, str] | None = None


def probe_idmapped_overlay(scratch: Path) -> tuple[bool, str]:
    """Whether this kernel takes an idmapped lower layer under overlayfs (cached)."""
    global _IDMAP_PROBE
    if _IDMAP_PROBE is not None:
        return _IDMAP_PROBE
    if os.geteuid() != 0:
        _IDMAP_PROBE = (False, "not root")
        return _IDMAP_PROBE
    probe = scratch / f"idmap-probe-{os.getpid()}"
    lower_src, lower, upper, work, merged = (probe / n for n in ("src", "lower", "upper", "work", "merged"))
    fd = -1
    try:
        for d in (lower_src, lower, upper, work, merged):
            d.mkdir(parents=True, exist_ok=True)
        (lower_src / "f").write_text("x")
        idmap = IdMap(UID_RANGE_START)
        fd = make_userns(idmap)
        idmapped_bind(lower_src, lower, fd)
        mount("overlay", merged, "overlay", MS_NODEV | MS_NOSUID, f"lowerdir={lower},upperdir={upper},workdir={work}")
        owner = (merged / "f").stat().st_uid
        _IDMAP_PROBE = (owner == idmap.base, f"idmapped lower layer shows owner {owner}")
    except OSError as exc:
        _IDMAP_PROBE = (False, f"idmapped mounts unavailable: {exc}")
    finally:
        if fd >= 0:
            os.close(fd)
        for d in (merged, lower):
            try:
                unmount(d)
            except OSError:
                pass
        shutil.rmtree(probe, ignore_errors=True)
    return _IDMAP_PROBE


# ---- root layers ------------------------------------------------------------------

_BAD_OPTION_CHARS = set(",:\\\n")


def _option_path(path: Path) -> str:
    text = str(path)
    if _BAD_OPTION_CHARS & set(text):
        raise SandboxError(f"path {text!r} contains one of , : \\ which overlay mount options cannot carry")
    return text


class RootLayer:
    """A writable root for one sandbox."""

    kind = ""

    def __init__(self, lower: Path, backend_dir: Path, size_mb: int, idmap: IdMap | None):
        self.template = lower
        self.backend_dir = backend_dir
        self.size_mb = size_mb
        self.idmap = idmap

    @property
    def root(self) -> Path:
        """The directory bwrap binds on ``/``."""
        raise NotImplementedError

    @property
    def upper(self) -> Path:
        """What a snapshot keeps (the writes over the template)."""
        raise NotImplementedError

    def prepared(self) -> bool:
        raise NotImplementedError

    def prepare(self, populate: Callable[[Path], None] | None = None, userns_fd: int | None = None) -> None:
        """Build the layer; ``populate(upper)`` fills the fresh upper before it is used;
        ``userns_fd`` is the sandbox's user namespace when the template is idmapped."""
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError

    def mounts(self) -> list[str]:
        """Mount points this layer makes, in mount order (for the undo record)."""
        return []

    def notes(self) -> list[str]:
        return []


def run_root() -> Path:
    """Where merged roots are mounted: a path an unprivileged uid can walk (``$MVM_HOME``
    is mode 0700), ``/run/mvm/ns`` (mode 0711) when ``/run`` is there."""
    base = Path("/run") if Path("/run").is_dir() else Path(tempfile.gettempdir())
    path = base / "mvm" / "ns"
    path.mkdir(parents=True, exist_ok=True)
    for p in (path.parent, path):
        p.chmod(0o711)
    return path


def run_dir_for(sandbox_id: str, state_dir: Path) -> Path:
    """This sandbox's directory under ``run_root()`` (unique per state directory, so two
    ``MVM_HOME``s may use the same sandbox id)."""
    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return run_root() / f"{sandbox_id}-{tag}"


class OverlayRoot(RootLayer):
    """An overlay over the read-only template whose upper and work directories live on a
    size-limited scratch file system (what the subclasses mount at ``scratch``)."""

    def __init__(self, lower: Path, backend_dir: Path, size_mb: int, idmap: IdMap | None, run_dir: Path):
        super().__init__(lower, backend_dir, size_mb, idmap)
        self.run_dir = run_dir

    @property
    def scratch(self) -> Path:
        return self.backend_dir / "scratch"

    @property
    def lower(self) -> Path:
        return self.backend_dir / "lower" if self.idmap else self.template

    @property
    def root(self) -> Path:
        return self.run_dir / "merged"

    @property
    def upper(self) -> Path:
        return self.scratch / "upper"

    def mounts(self) -> list[str]:
        out = [str(self.scratch)]
        if self.idmap:
            out.append(str(self.backend_dir / "lower"))
        return [*out, str(self.root)]

    def prepared(self) -> bool:
        return is_mounted(self.root)

    def _mount_scratch(self) -> None:
        """Mount an empty file system of ``size_mb`` on ``scratch``, mode 0700."""
        raise NotImplementedError

    def _scratch_gone(self) -> None:
        """After the unmounts: remove what ``_mount_scratch`` left besides the mount."""

    def prepare(self, populate: Callable[[Path], None] | None = None, userns_fd: int | None = None) -> None:
        if self.prepared():
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        # only the sandbox's uid (bwrap runs as it) may walk to the merged root
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        owner = self.idmap.base if self.idmap else 0
        os.chown(self.run_dir, owner, owner)
        self.root.mkdir(exist_ok=True)
        try:
            self._mount_scratch()
            work = self.scratch / "work"
            self.upper.mkdir()
            work.mkdir()
            self.upper.chmod(0o755)
            if self.idmap:
                os.chown(self.upper, self.idmap.base, self.idmap.base)  # the sandbox's "/" is its root's
                if userns_fd is None:
                    raise SandboxError("an idmapped root needs the sandbox's user namespace")
                (self.backend_dir / "lower").mkdir(exist_ok=True)
                idmapped_bind(self.template, self.backend_dir / "lower", userns_fd)
            if populate is not None:
                populate(self.upper)
            options = ",".join(
                [
                    f"lowerdir={_option_path(self.lower)}",
                    f"upperdir={_option_path(self.upper)}",
                    f"workdir={_option_path(work)}",
                    # keep the upper self-contained (a snapshot of it must mean the same later):
                    # renaming a template directory copies it instead of storing a redirect
                    "redirect_dir=off",
                    "index=off",
                    "metacopy=off",
                ]
            )
            mount("overlay", self.root, "overlay", MS_NODEV | MS_NOSUID, options)
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        for path in reversed(self.mounts()):
            unmount(path)
        self._scratch_gone()
        for directory in (self.root, self.run_dir, self.backend_dir / "lower", self.scratch):
            try:
                directory.rmdir()
            except OSError:
                pass


class OverlayImageRoot(OverlayRoot):
    """The scratch file system is an ext4 image file of ``size_mb`` under the sandbox's
    directory, on a loop device (``diskimage``): disk, not memory."""

    kind = "overlay-image"
    IMAGE_NAME = "disk.ext4"

    @property
    def image(self) -> Path:
        return self.backend_dir / self.IMAGE_NAME

    def _mount_scratch(self) -> None:
        diskimage.make_image(self.image, self.size_mb)
        device, path = diskimage.attach(self.image)
        try:
            # noinit_itable: no background zeroing of inode tables (the sparse image reads zeros)
            mount(path, self.scratch, "ext4", MS_NODEV | MS_NOSUID | MS_NOATIME, "noinit_itable")
        finally:
            os.close(device)  # the mount holds the device now; autoclear detaches it with the mount
        self.scratch.chmod(0o700)

    def teardown(self) -> None:
        diskimage.shut_down(self.scratch, self.image)  # its dirty pages are not written to a file about to go
        super().teardown()

    def _scratch_gone(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()

    def notes(self) -> list[str]:
        return [
            f"root: overlay over the read-only template; writes go to a {self.size_mb} MiB ext4 disk image "
            "(a sparse file in the sandbox's directory under MVM_HOME, on a loop device): a write past "
            "rootfs_size_mb fails with 'No space left on device'; file data is page cache the kernel writes "
            "back and reclaims within memory_mb, never an out-of-memory kill; the disk is deleted on destroy",
        ]


class OverlayTmpfsRoot(OverlayRoot):
    """The scratch file system is a tmpfs of ``size_mb``: RAM, charged to the memory cgroup
    of whoever writes it (the sandbox). Used when the host has no loop devices."""

    kind = "overlay-tmpfs"

    def _mount_scratch(self) -> None:
        mount("tmpfs", self.scratch, "tmpfs", MS_NODEV | MS_NOSUID, f"size={self.size_mb}m,mode=0700")

    def notes(self) -> list[str]:
        return [
            f"root: overlay over the read-only template; writes go to a {self.size_mb} MiB tmpfs "
            "(RAM, charged to the sandbox's memory cgroup when written from inside) and are lost on destroy",
        ]


class FuseOverlayRoot(RootLayer):
    kind = "fuse-overlayfs"

    @property
    def root(self) -> Path:
        return self.backend_dir / "merged"

    @property
    def upper(self) -> Path:
        return self.backend_dir / "upper"

    def mounts(self) -> list[str]:
        return [str(self.root)]

    def prepared(self) -> bool:
        return is_mounted(self.root)

    def prepare(self, populate: Callable[[Path], None] | None = None, userns_fd: int | None = None) -> None:
        if self.prepared():
            return
        work = self.backend_dir / "work"
        for path in (self.upper, work, self.root):
            path.mkdir(parents=True, exist_ok=True)
        if populate is not None:
            populate(self.upper)
        binary = shutil.which("fuse-overlayfs")
        if binary is None:
            raise SandboxError("fuse-overlayfs is not installed")
        options = f"lowerdir={_option_path(self.template)},upperdir={_option_path(self.upper)},workdir={work}"
        subprocess.run([binary, "-o", options, str(self.root)], check=True, capture_output=True, timeout=30)

    def teardown(self) -> None:
        if is_mounted(self.root):
            for tool in ("fusermount3", "fusermount"):
                if shutil.which(tool):
                    subprocess.run([tool, "-u", "-z", str(self.root)], capture_output=True, timeout=30)
                    break
        if is_mounted(self.root):
            unmount(self.root)
        shutil.rmtree(self.backend_dir / "work", ignore_errors=True)
        shutil.rmtree(self.upper, ignore_errors=True)

    def notes(self) -> list[str]:
        return ["root: fuse-overlayfs over the template (no root); rootfs_size_mb is NOT enforced"]


class CopyRoot(RootLayer):
    kind = "copy"

    @property
    def root(self) -> Path:
        return self.backend_dir / "rootfs"

    @property
    def upper(self) -> Path:
        return self.root

    def prepared(self) -> bool:
        return (self.root / ".mvm-copy-complete").exists()

    def prepare(self, populate: Callable[[Path], None] | None = None, userns_fd: int | None = None) -> None:
        if self.prepared():
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        if populate is not None:
            # a snapshot of a copy is the whole tree
            self.root.mkdir(parents=True)
            populate(self.root)
        elif os.geteuid() == 0 and shutil.which("cp"):
            # GNU cp: fast (reflinks where the file system has them), keeps owners and device nodes
            done = subprocess.run(
                ["cp", "-a", "--reflink=auto", "--", str(self.template), str(self.root)],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise SandboxError(f"copying the template failed: {done.stderr.strip()[-500:]}")
        else:
            shutil.copytree(self.template, self.root, symlinks=True, ignore=_special_files)
        (self.root / ".mvm-copy-complete").touch()

    def teardown(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def notes(self) -> list[str]:
        return ["root: a private copy of the template (no root, no fuse-overlayfs); rootfs_size_mb is NOT enforced"]


def _special_files(directory: str, names: list[str]) -> set[str]:
    """Device nodes, fifos and sockets are not copied (a read of /dev/zero never ends;
    the sandbox gets its own /dev from bwrap)."""
    skip = set()
    for name in names:
        try:
            mode = os.lstat(os.path.join(directory, name)).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skip.add(name)
    return skip


def wait_unmounted(paths: list[str], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = set(mount_points())
        if not any(p in current for p in paths):
            return True
        time.sleep(0.01)
    return False
