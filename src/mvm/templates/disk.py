"""The VM backend's root disk: a read-only ext4 image of a template's rootfs.

``mkfs.ext4 -d ROOTFS`` fills the filesystem from the directory (no loop mount, no
root needed for that step). Size: the tree's allocated size + 30 % + 64 MiB, so the
guest has headroom for its per-VM copy-on-write overlay to grow into; inodes: the
tree's count + 50 % + 8192. The image is made beside the rootfs under a lock, renamed
into place, and left mode 0444: VMs open it ``readonly=on`` and write to their own
qcow2 overlays.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

from ..errors import TemplateBuildError
from . import store
from .image import TemplateImage

MIB = 2**20
_TMP_PREFIX = ".rootfs.ext4.tmp+"


def raw_disk_size(tree_bytes: int) -> int:
    """Bytes of the ext4 image for a tree of ``tree_bytes``: +30 % + 64 MiB, whole MiB."""
    size = int(tree_bytes * 1.3) + 64 * MIB
    return -(-size // MIB) * MIB


def build_raw_disk(image: TemplateImage) -> Path:
    """``image.raw_disk``, made first if missing. Concurrent callers make it once."""
    target = image.raw_disk
    if target.exists():
        return target
    with store.build_lock(f"{image.directory.name}.ext4"):
        if target.exists():
            return target
        for debris in image.directory.glob(_TMP_PREFIX + "*"):  # a crashed mkfs; we hold the lock
            debris.unlink(missing_ok=True)
        mkfs = store.host_tool("mkfs.ext4")
        tree_bytes, inodes = _tree_usage(image)
        tmp = image.directory / f"{_TMP_PREFIX}{secrets.token_hex(4)}"
        argv = [mkfs, "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "mvm-root",
                "-N", str(inodes + inodes // 2 + 8192), "-d", str(image.rootfs),
                str(tmp), f"{raw_disk_size(tree_bytes) // 1024}k"]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise TemplateBuildError(
                    f"template {image.name}: mkfs.ext4 failed: {(result.stderr or result.stdout).strip()[-2000:]}",
                    template=image.name,
                )
            tmp.chmod(0o444)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.rename(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def _tree_usage(image: TemplateImage) -> tuple[int, int]:
    try:
        manifest = json.loads(image.manifest_path.read_text())
        return int(manifest["size"]), int(manifest["inodes"])
    except (OSError, ValueError, KeyError, TypeError):
        return store.tree_usage(image.rootfs)
