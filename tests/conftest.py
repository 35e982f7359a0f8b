"""Test-session setup: a private ``MVM_HOME`` per run; built templates and derived
caches (kernels, VM ready snapshots) shared with the user's ``~/.mvm`` so the
suite does not rebuild what the README's setup already built."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_USER_HOME = Path(os.environ.get("MVM_HOME") or Path.home() / ".mvm")
os.environ.setdefault("MVM_TEMPLATES", str(_USER_HOME / "templates"))
os.environ.setdefault("MVM_CACHE", str(_USER_HOME / "cache"))
# Short path: Unix socket paths must stay under 108 bytes.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="mvmt-", dir="/tmp"))
os.environ["MVM_HOME"] = str(_SESSION_HOME)
os.environ.pop("MVM_BACKEND", None)
os.environ.pop("MVM_MODE", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import mvm
    from mvm.sdk.pool import close_pool, pools
    from mvm.supervisor.state import list_sandboxes

    try:
        for pool in pools():  # their unclaimed members first (a pool's owner would refill)
            close_pool(pool.id)
        for record in list_sandboxes():
            if record["state"] != "lost":
                mvm.Sandbox.connect(record["id"]).kill()
        mvm.gc()  # a sandbox whose supervisor a test killed
    finally:
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture
def mvm_home() -> Path:
    return _SESSION_HOME
