"""Every test in this package gets its own ``MVM_HOME`` (``tmp_path``): real keys, real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def mvm_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    for var in [v for v in os.environ if v.startswith("MVM_SECRET_")] + ["MVM_SNAPSHOT_EXPIRES"]:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
