"""Shared helpers of tests/typescript (imported by conftest and the tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SDK = REPO / "sdks" / "typescript"
# Not `-m mvm.cli.main`: running main.py as __main__ imports it twice (circular import).
MVMCTL = [sys.executable, "-c", "from mvm.cli.main import main; main()"]


def mvmctl_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVM_SECRET_") and k != "MVM_MODE"}
    mvmctl = Path(sys.executable).with_name("mvmctl")
    if mvmctl.is_file():
        env["MVMCTL"] = str(mvmctl)
    env.update(extra)
    return env


def run_mvmctl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MVMCTL, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else mvmctl_env(), cwd=cwd)
