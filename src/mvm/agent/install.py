"""Copy the guest agent (and the protocol codec it speaks) into a template's root.

Inside the guest the agent lives at ``/opt/mvm/mvm/{agent,protocol}`` with an
empty ``mvm/__init__.py`` (the host package's ``__init__`` imports the SDK,
which the guest has no use for), started by ``/opt/mvm/bin/mvm-agent``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # src/mvm
_GUEST_PACKAGES = ("agent", "protocol")

LAUNCHER = """\
import sys
sys.path.insert(0, "/opt/mvm")
from mvm.agent.__main__ import main
sys.exit(main())
"""


def _sources() -> list[tuple[str, Path]]:
    """``(package/name.py, path)`` of every guest file, in name order."""
    files: list[tuple[str, Path]] = []
    for package in _GUEST_PACKAGES:
        with os.scandir(_PACKAGE_ROOT / package) as entries:  # not Path.glob: ~10x cheaper per create
            names = sorted(entry.name for entry in entries if entry.name.endswith(".py"))
        files.extend((f"{package}/{name}", _PACKAGE_ROOT / package / name) for name in names)
    return files


#: A file changed less than this long ago may change again within the same timestamp
#: tick (the kernel stamps files with a coarse clock), so its stat cannot vouch for its
#: content yet: the digest is then computed but not cached (git's "racily clean" rule).
_SETTLED_NS = 2_000_000_000
_cached: tuple[tuple[tuple[str, int, int, int, int], ...], str] | None = None
_cache_lock = threading.Lock()


def source_digest() -> str:
    """sha256 over the agent's files: part of every template's content hash.

    Every sandbox create asks for it (``ensure_template``): it is cached, keyed by each
    file's name, inode, size, mtime and ctime, so a create stats the files instead of
    reading and hashing them; any edit (or an added or removed file) computes it anew."""
    global _cached
    sources = _sources()
    stats = [(rel, os.stat(path)) for rel, path in sources]
    key = tuple((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for rel, st in stats)
    with _cache_lock:
        if _cached is not None and _cached[0] == key:
            return _cached[1]
    digest = hashlib.sha256(LAUNCHER.encode())
    for rel, path in sources:
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    result = digest.hexdigest()
    newest = max((max(st.st_mtime_ns, st.st_ctime_ns) for _, st in stats), default=0)
    if time.time_ns() - newest > _SETTLED_NS:
        with _cache_lock:
            _cached = (key, result)
    return result


def install_into(rootfs: Path, *, precompile: bool = True) -> None:
    """Install (or refresh) the agent under ``rootfs/opt/mvm``. ``precompile=False``
    for roots whose ``/usr/bin/python3`` is not trusted to run on the host (OCI images:
    ``mvm.templates.runtime`` compiles there, sandboxed)."""
    base = rootfs / "opt" / "mvm"
    package = base / "mvm"
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""mvm guest side: the agent and the protocol codec."""\n')
    for rel, path in _sources():
        target = package / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (base / "bin").mkdir(parents=True, exist_ok=True)
    launcher = base / "bin" / "mvm-agent"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    if precompile:
        _precompile(rootfs)


def _precompile(rootfs: Path) -> None:
    """Byte-compile the agent with the guest's own Python, so no sandbox pays for it at
    every start (~0.1 s each). Needs root (chroot); without it the guest compiles lazily."""
    python = rootfs / "usr" / "bin" / "python3"
    if os.geteuid() != 0 or not python.exists():
        return
    subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-m", "compileall", "-q", "/opt/mvm"],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
