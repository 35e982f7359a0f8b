"""What the framework adapters share: the template they default to, and how a
framework's relative paths map onto the guest."""

from __future__ import annotations

import posixpath
from pathlib import Path

#: The adapters' default template: python-3.13's packages plus adduser/passwd/procps, which eval
#: harnesses call (create a user, run as it, look for leftover processes). Built on first use.
EVAL_TEMPLATE = str(Path(__file__).with_name("eval-tools.toml"))

#: Where a framework's relative paths and commands land unless configured otherwise.
DEFAULT_WORKDIR = "/root"


def guest_path(workdir: str, path: str) -> str:
    """``path`` as an absolute guest path: relative ones are taken from ``workdir``."""
    return path if path.startswith("/") else posixpath.normpath(posixpath.join(workdir, path))
