"""A sandbox's disk on the host's disk: a sparse ext4 image file, attached to a loop device.

The overlay's upper layer lives on it (``overlay.OverlayImageRoot``), so what a sandbox
writes is bounded by the image's size -- a write past it fails with ENOSPC in the
sandbox -- and, unlike a tmpfs, is page cache the kernel can write back and reclaim:
it is charged to the sandbox's memory cgroup while cached, but filling the disk never
ends in an out-of-memory kill.

* ``make_image``: a sparse copy of a blank image made once per size by ``mke2fs`` (no
  journal: the disk is thrown away with the sandbox; inode tables zeroed lazily, i.e.
  never: a sparse file reads zeros).
* ``attach``: ``LOOP_CTL_GET_FREE`` + ``LOOP_CONFIGURE`` with *autoclear* (the device
  detaches itself when its last user goes: the mount, or this process if it dies before
  mounting) and *direct I/O* (the image's blocks are not cached twice on the host).
* ``shut_down``: ``FS_IOC_SHUTDOWN`` without flushing, before the unmount of a disk that
  is about to be deleted: its dirty pages are dropped instead of written out.
* ``detach_backed_by``: loop devices whose backing file is under a directory (what an
  orphan cleanup frees if an unmount could only be lazy).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

from ...osutil import exit_description
from ...paths import cache_dir

LOOP_CONTROL = "/dev/loop-control"
LOOP_MAJOR = 7
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
FS_GOING_FLAGS_NOLOGFLUSH = 0x2
#: bytes of file data per inode: room for 128 Ki files on the default 1 GiB disk (tmpfs,
#: the layout this replaces, had more inodes than a pip or npm install needs; mke2fs's
#: default of 16 KiB could run out of inodes before bytes)
BYTES_PER_INODE = 8192
MKE2FS_TIMEOUT = 60.0
_ATTACH_TRIES = 16


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * 64),
        ("lo_crypt_name", ctypes.c_uint8 * 64),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


def support() -> tuple[bool, str]:
    """Whether this host can give a sandbox a loop-mounted disk, and if not, why."""
    if os.geteuid() != 0:
        return False, "loop devices need root"
    if shutil.which("mke2fs") is None:
        return False, "mke2fs is not installed (apt-get install e2fsprogs)"
    if not os.path.exists(LOOP_CONTROL):
        return False, f"{LOOP_CONTROL} is missing (no loop devices: modprobe loop)"
    if "ext4" not in Path("/proc/filesystems").read_text():
        return False, "the kernel has no ext4 file system"
    return True, "ext4 image on a loop device"


MKE2FS_OPTIONS = (
    "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-i", str(BYTES_PER_INODE),
    "-m", "0",  # no blocks kept for host root: the sandbox gets all of its size
    # no journal (the disk goes with the sandbox), no room kept to grow it: a blank of ~150 KiB to copy
    "-O", "^has_journal,^resize_inode", "-E", "lazy_itable_init=1,nodiscard",
)


def make_image(image: Path, size_mb: int) -> None:
    """A new sparse file ``image`` of ``size_mb`` MiB holding an empty ext4 file system: a
    copy of the blank one of that size under ``cache_dir()`` (made by ``mke2fs`` once;
    copying its few written blocks takes a fraction of a fresh ``mke2fs``'s time)."""
    _sparse_copy(_blank(size_mb), image)


def _blank(size_mb: int) -> Path:
    tag = hashlib.sha256(" ".join(MKE2FS_OPTIONS).encode()).hexdigest()[:12]
    blank = cache_dir() / "blank-disks" / f"ext4-{size_mb}m-{tag}.img"
    if blank.exists():
        return blank
    blank.parent.mkdir(parents=True, exist_ok=True)
    partial = blank.with_name(f".{blank.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(partial, "wb") as handle:
            handle.truncate(size_mb * 1024 * 1024)
        done = subprocess.run(["mke2fs", *MKE2FS_OPTIONS, str(partial)], capture_output=True, text=True,
                              timeout=MKE2FS_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            said = done.stderr.strip()[-300:] or f"it {exit_description(done.returncode)}"
            raise OSError(errno.EIO, f"mke2fs {partial}: {said}")
        os.replace(partial, blank)  # whole or not at all (two makers write the same thing)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return blank


def _sparse_copy(source: Path, dest: Path) -> None:
    """Copy ``source``'s data ranges into a new ``dest`` of the same size; holes stay holes."""
    with open(source, "rb") as src, open(dest, "xb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            position = start
            while position < end:
                try:
                    copied = os.copy_file_range(src.fileno(), dst.fileno(), end - position, position, position)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    copied = os.pwrite(dst.fileno(), os.pread(src.fileno(), min(end - position, 1 << 20), position),
                                       position)
                if copied <= 0:
                    raise OSError(errno.EIO, f"copying {source} to {dest}: no progress at {position}")
                position += copied
            offset = end


def attach(image: Path) -> tuple[int, str]:
    """Attach ``image`` to a free loop device; returns the open device fd and its path.
    The device detaches itself once the fd is closed and nothing (a mount) uses it."""
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_ATTACH_TRIES):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                path = f"/dev/loop{number}"
                try:
                    device = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise OSError(errno.ENODEV, f"{path} has no device node (no devtmpfs?)") from None
                config = _LoopConfig(fd=backing)
                config.info.lo_flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO
                try:
                    fcntl.ioctl(device, LOOP_CONFIGURE, config)
                except OSError as exc:
                    os.close(device)
                    if exc.errno == errno.EBUSY:  # another process took it between GET_FREE and here
                        continue
                    raise OSError(exc.errno, f"LOOP_CONFIGURE {path} with {image}: {exc.strerror}") from None
                return device, path
        finally:
            os.close(control)
    finally:
        os.close(backing)
    raise OSError(errno.EBUSY, f"no free loop device for {image} after {_ATTACH_TRIES} tries")


def shut_down(mount_point: Path, image: Path) -> None:
    """Stop all I/O to the file system at ``mount_point`` without writing its dirty pages
    back (it is about to be unmounted and deleted). Only when that file system is on a
    loop device backed by ``image`` -- never the host's own file system, whatever raced.
    Best effort: without it the unmount writes the pages out first."""
    try:
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if _backing_file(os.fstat(fd).st_dev) != os.path.realpath(image):
            return
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, FS_GOING_FLAGS_NOLOGFLUSH.to_bytes(4, "little"))
    except OSError:
        pass
    finally:
        os.close(fd)


def _backing_file(device: int) -> str | None:
    """The file behind the loop device numbered ``device``; None for any other device."""
    if os.major(device) != LOOP_MAJOR:
        return None
    try:
        text = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/loop/backing_file").read_text()
    except OSError:
        return None
    return text.rstrip("\n")


def backed_by(directory: Path) -> list[str]:
    """Loop devices (``/dev/loopN``) whose backing file is (or was, if deleted) in ``directory``."""
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        if backing.startswith(prefix):
            found.append(f"/dev/{entry.name}")
    return sorted(found)


def detach_backed_by(directory: Path) -> list[str]:
    """Detach the loop devices ``backed_by(directory)``; a device still in use (a lazily
    unmounted file system) is only marked to detach when its last user goes. Returns
    errors."""
    errors = []
    for path in backed_by(directory):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"open {path}: {exc}")
            continue
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EBUSY):  # already detached / detaches when freed
                errors.append(f"detach {path}: {exc}")
        finally:
            os.close(fd)
    return errors
