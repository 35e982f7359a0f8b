"""Disks: a read-only raw ext4 base per (template, size), a qcow2 overlay per sandbox.

* The template's root as a raw ext4 image comes from ``mvm.templates.build_raw_disk``
  (``mkfs.ext4 -d ROOTFS``, no loop mount).
* The guest filesystem must be exactly ``rootfs_size_mb`` big (that is the limit
  the guest can fill), so a *sized* base ``rootfs-<size>M.ext4`` is derived once
  per size, beside the template's image, with an offline ``resize2fs`` of a
  sparse copy, and shared read-only by every VM of that template and size.
* Each VM writes to its own qcow2 overlay (``-b base -F raw``); snapshots freeze
  an overlay and chain new ones on top.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable, InvalidArgument, SandboxError
from ...paths import cache_dir
from ...templates.image import TemplateImage
from ...osutil import file_lock
from .qemu import qemu_img

MIB = 1024 * 1024


def disks_dir() -> Path:
    path = cache_dir() / "vm-disks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(argv: list[str], what: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise BackendUnavailable(f"vm: {argv[0]} is not installed (needed to {what})") from None
    if proc.returncode != 0:
        raise SandboxError(f"vm: {what} failed: {' '.join(argv)}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def _template_raw_disk(image: TemplateImage) -> Path:
    """The template's raw ext4 image (``mvm.templates`` builds it beside the rootfs, once)."""
    from ...templates.disk import build_raw_disk

    return Path(build_raw_disk(image))


def sized_base(image: TemplateImage, size_mb: int) -> Path:
    """A read-only raw ext4 base of exactly ``size_mb`` MiB holding the template's root."""
    source = _template_raw_disk(image)
    if source.stat().st_size == size_mb * MIB:
        return source
    # Beside the template's own image, so removing the template removes its sized copies too;
    # in the cache when the template tree is read-only to us.
    home = image.directory if os.access(image.directory, os.W_OK) else disks_dir()
    path = home / f"rootfs-{size_mb}M.ext4" if home == image.directory else (
        home / f"{image.name}-{image.digest[:16]}-{size_mb}M.ext4"
    )
    if path.is_file():
        return path
    with file_lock(home / ".rootfs-sized.lock"):
        if path.is_file():
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        _run(["cp", "--sparse=always", "--reflink=auto", str(source), str(tmp)], "copy the template disk")
        try:
            # resize2fs insists on a freshly checked filesystem; -p repairs nothing silently.
            subprocess.run(["e2fsck", "-f", "-p", str(tmp)], capture_output=True, timeout=300, check=False)
            proc = subprocess.run(
                ["resize2fs", str(tmp), f"{size_mb}M"], capture_output=True, text=True, timeout=600, check=False
            )
            if proc.returncode != 0:
                if "No space left" in proc.stderr or "smaller than minimum" in proc.stderr:
                    minimum = _minimum_mb(source)
                    raise InvalidArgument(
                        "rootfs_size_mb",
                        f"{size_mb} MiB cannot hold template {image.name!r}",
                        allowed=f">= {minimum}",
                    )
                raise SandboxError(f"vm: resize2fs of the template disk failed: {proc.stderr.strip()[-800:]}")
            os.truncate(tmp, size_mb * MIB)
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _minimum_mb(raw: Path) -> int:
    try:
        out = subprocess.run(["resize2fs", "-P", str(raw)], capture_output=True, text=True, timeout=60).stdout
        blocks = int(out.strip().split(":")[-1])
        return blocks * 4096 // MIB + 16
    except (ValueError, OSError, subprocess.SubprocessError):
        return 0


def create_overlay(path: Path, backing: Path, backing_format: str, size_mb: int | None = None) -> None:
    """A qcow2 overlay over ``backing`` (absolute path recorded in its header)."""
    binary = qemu_img() or "qemu-img"
    argv = [binary, "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()), "-F", backing_format, str(path)]
    if size_mb is not None:
        argv.append(f"{size_mb}M")
    _run(argv, "create the sandbox's disk overlay", timeout=60)
    os.chmod(path, 0o600)


def image_info(path: Path) -> dict[str, Any]:
    binary = qemu_img() or "qemu-img"
    out = _run([binary, "info", "-U", "--output=json", str(path)], "inspect a disk image", timeout=60).stdout
    info = json.loads(out)
    return info if isinstance(info, dict) else {}


def flatten_onto(frozen: Path, base: Path, dest: Path) -> None:
    """Write into ``dest`` one qcow2 layer over ``base`` holding everything ``frozen``'s chain
    adds above it — so a snapshot never depends on files inside the sandbox it came from."""
    info = image_info(frozen)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing and Path(backing).resolve() == base.resolve():
        shutil.copyfile(frozen, dest)  # already a single layer over the base
    else:
        binary = qemu_img() or "qemu-img"
        _run(
            [binary, "convert", "-U", "-q", "-O", "qcow2", "-B", str(base.resolve()), "-F", "raw",
             str(frozen), str(dest)],
            "write the snapshot's disk layer",
        )
    os.chmod(dest, 0o600)


def link_or_copy(source: Path, dest: Path) -> None:
    """Pin an immutable image (a snapshot's frozen disk) for this sandbox: a hard link when
    possible, so deleting the snapshot later cannot pull the disk from under a running VM."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
        os.chmod(dest, 0o600)
