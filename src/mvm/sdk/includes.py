"""``include=[...]``: host files copied into the sandbox's ``/app``.

Paths are relative to a base folder (the script's folder, or the cwd) and keep
their relative layout (``src/x.py`` → ``/app/src/x.py``). Nothing outside the
base folder is read: an include that escapes it is refused, and a symlink whose
target lies outside the included tree is skipped, never followed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .. import errors
from ..errors import shown

GUEST_ROOT = "/app"
#: Refuse to copy more than this into a sandbox at create (use files.write for more).
MAX_INCLUDE_BYTES = 512 * 1024 * 1024


def collect_includes(paths: Sequence[str], base_dir: Path) -> list[tuple[str, bytes, int]]:
    """Return ``(guest_path, content, mode)`` for every regular file to copy."""
    if isinstance(paths, str):
        raise errors.InvalidArgument("include", "must be a list of paths, not one string", allowed="e.g. ['src']")
    base = base_dir.resolve()
    out: list[tuple[str, bytes, int]] = []
    total = 0
    for entry in paths:
        if not isinstance(entry, str) or not entry:
            raise errors.InvalidArgument("include", f"{shown(entry)} is not a path")
        target = (base / entry).resolve()
        if target != base and base not in target.parents:
            raise errors.InvalidArgument("include", f"{shown(entry)} lies outside {base}",
                                         allowed=f"paths under {base}")
        if not target.exists():
            raise errors.InvalidArgument("include", f"{shown(entry)} does not exist under {base}")
        root = target
        for path in _walk(target):
            real = path.resolve()
            if real != root and root not in real.parents:
                continue  # a symlink out of the included tree: never followed
            if not real.is_file():
                continue
            rel = path.relative_to(base).as_posix()
            data = real.read_bytes()
            total += len(data)
            if total > MAX_INCLUDE_BYTES:
                raise errors.InvalidArgument("include", f"more than {MAX_INCLUDE_BYTES} bytes to copy")
            out.append((f"{GUEST_ROOT}/{rel}", data, real.stat().st_mode & 0o777))
    return out


def _walk(target: Path) -> list[Path]:
    if not target.is_dir():
        return [target]
    files = []
    for dirpath, dirnames, filenames in os.walk(target, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            files.append(Path(dirpath) / name)
    return files
