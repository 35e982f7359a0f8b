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
    files: list[tuple[str, Path]] = []
    for package in _GUEST_PACKAGES:
        for path in sorted((_PACKAGE_ROOT / package).glob("*.py")):
            files.append((f"{package}/{path.name}", path))
    return files


def source_digest() -> str:
    """sha256 over the agent's files: part of every template's content hash."""
    digest = hashlib.sha256(LAUNCHER.encode())
    for rel, path in _sources():
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


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
