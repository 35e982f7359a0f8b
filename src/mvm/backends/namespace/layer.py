"""Save and restore a sandbox's writable layer (the overlay upper directory) as a tar.

What overlayfs keeps in an upper directory must survive the round trip exactly:

* whiteouts (a deleted template file) are character devices 0:0;
* opaque directories (a template directory replaced wholesale) and copy-up origins
  are ``trusted.overlay.*`` extended attributes; file capabilities are
  ``security.capability``. Every xattr is stored hex-encoded in the member's pax
  header ``MVM.xattr.<name>``;
* owners are host uids of the sandbox's id range (``IdMap``). The archive records
  the range's base (``MVM.uid_base``) and a restore into a sandbox with another
  range shifts owners into it.

Extraction never follows a symlink: every parent is opened component by component
with ``O_NOFOLLOW`` relative to the destination, so a member cannot write outside it.
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path
from typing import IO

XATTR_PREFIX = "MVM.xattr."
UID_BASE_KEY = "MVM.uid_base"
UID_COUNT_KEY = "MVM.uid_count"


def _xattrs(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        try:
            out[XATTR_PREFIX + name] = os.getxattr(path, name, follow_symlinks=False).hex()
        except OSError:
            continue
    return out


def pack(upper: Path, fileobj: IO[bytes], uid_base: int = 0, uid_count: int = 0) -> int:
    """Write ``upper`` into ``fileobj`` as a pax tar; returns the number of members."""
    count = 0
    hardlinks: dict[tuple[int, int], str] = {}
    headers = {UID_BASE_KEY: str(uid_base), UID_COUNT_KEY: str(uid_count)}
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT, pax_headers=headers) as tar:

        def add(path: str, arcname: str) -> None:
            nonlocal count
            st = os.lstat(path)
            info = tarfile.TarInfo(arcname)
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            info.mtime = int(st.st_mtime)
            info.pax_headers = _xattrs(path)
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in hardlinks:
                info.type = tarfile.LNKTYPE
                info.linkname = hardlinks[key]
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    hardlinks[key] = arcname
                info.type = tarfile.REGTYPE
                info.size = st.st_size
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as handle:
                    tar.addfile(info, handle)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tar.addfile(info)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:  # sockets cannot be archived (and mean nothing after a restart)
                return
            count += 1

        def walk(directory: str, prefix: str) -> None:
            with os.scandir(directory) as entries:
                names = sorted(entry.name for entry in entries)
            for name in names:
                path = os.path.join(directory, name)
                arcname = f"{prefix}{name}"
                add(path, arcname)
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    walk(path, arcname + "/")

        add(str(upper), ".")
        walk(str(upper), "")
    return count


def _safe_parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or any(p == ".." for p in parts):
        raise ValueError(f"unsafe member name {name!r}")
    return parts


def _open_dir(root_fd: int, parts: list[str]) -> int:
    """Open the directory ``parts`` below ``root_fd`` without following any symlink."""
    fd = os.dup(root_fd)
    for part in parts:
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _shift(value: int, old_base: int, old_count: int, new_base: int) -> int:
    if old_count and old_base <= value < old_base + old_count:
        return value - old_base + new_base
    return value


def unpack(fileobj: IO[bytes], dest: Path, uid_base: int = 0) -> int:
    """Recreate an archive from ``pack`` into the empty directory ``dest``."""
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    count = 0
    dir_times: list[tuple[list[str], float]] = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                headers = tar.pax_headers
                old_base = int(headers.get(UID_BASE_KEY, "0"))
                old_count = int(headers.get(UID_COUNT_KEY, "0"))
                uid = _shift(member.uid, old_base, old_count, uid_base)
                gid = _shift(member.gid, old_base, old_count, uid_base)
                parts = _safe_parts(member.name)
                xattrs = {
                    k[len(XATTR_PREFIX) :]: bytes.fromhex(v)
                    for k, v in member.pax_headers.items()
                    if k.startswith(XATTR_PREFIX)
                }
                if not parts:  # the upper directory itself
                    os.chown(root_fd, uid, gid)
                    os.chmod(root_fd, member.mode)
                    _set_xattrs(root_fd, xattrs)
                    dir_times.append(([], member.mtime))
                    count += 1
                    continue
                parent = _open_dir(root_fd, parts[:-1])
                name = parts[-1]
                try:
                    _extract_one(tar, member, parent, name, root_fd, uid, gid, xattrs)
                finally:
                    os.close(parent)
                if member.isdir():
                    dir_times.append((parts, member.mtime))
                count += 1
        for parts, mtime in reversed(dir_times):
            fd = _open_dir(root_fd, parts)
            try:
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    return count


def _set_xattrs(target: int | str, xattrs: dict[str, bytes], follow: bool = True) -> None:
    for name, value in xattrs.items():
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError:
            if name.startswith("trusted.overlay."):
                raise


def _extract_one(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    parent: int,
    name: str,
    root_fd: int,
    uid: int,
    gid: int,
    xattrs: dict[str, bytes],
) -> None:
    if member.isdir():
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.chown(fd, uid, gid)
            os.chmod(fd, member.mode)
            _set_xattrs(fd, xattrs)
        finally:
            os.close(fd)
    elif member.isreg():
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            source = tar.extractfile(member)
            assert source is not None
            while chunk := source.read(1024 * 1024):
                os.write(fd, chunk)
            os.chown(fd, uid, gid)
            os.chmod(fd, member.mode)  # after chown, which clears set-id bits
            _set_xattrs(fd, xattrs)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
    elif member.issym():
        os.symlink(member.linkname, name, dir_fd=parent)
        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        _set_xattrs(f"/proc/self/fd/{parent}/{name}", xattrs, follow=False)
    elif member.islnk():
        target_parts = _safe_parts(member.linkname)
        target_parent = _open_dir(root_fd, target_parts[:-1])
        try:
            os.link(target_parts[-1], name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(target_parent)
    elif member.ischr() or member.isblk():
        if not (member.ischr() and member.devmajor == 0 and member.devminor == 0):
            return  # only overlay whiteouts belong in an upper directory
        os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent)
        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        _set_xattrs(f"/proc/self/fd/{parent}/{name}", xattrs, follow=False)
    elif member.isfifo():
        os.mkfifo(name, member.mode, dir_fd=parent)
        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
