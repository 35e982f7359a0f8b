"""Shared constants and helpers of tests/modes (imported by conftest and the tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "seed_example.py"
# Not `-m mvm.cli.main`: running main.py as __main__ imports it twice (circular import).
MVMCTL = [sys.executable, "-c", "from mvm.cli.main import main; main()"]
CANARY = "canary-0f5e2b9c-do-not-leak"


def run_mvmctl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MVMCTL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def assert_nothing_booted(home: Path) -> None:
    sandboxes = home / "sandboxes"
    assert not sandboxes.exists() or not any(sandboxes.iterdir()), list(sandboxes.iterdir())
