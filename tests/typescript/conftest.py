"""The TypeScript SDK (sdks/typescript) from pytest: Node and the SDK's locked
dependencies must be there (./setup.sh runs `npm ci`); tests skip, saying why, only
when Node itself is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from ts_helpers import SDK


@pytest.fixture(scope="session")
def ts_sdk() -> Path:
    """The SDK folder, with its node_modules installed from the lockfile."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed: the TypeScript SDK cannot run here (./setup.sh installs them)")
    if not (SDK / "node_modules" / "typescript").is_dir():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=SDK, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"npm ci in {SDK} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return SDK
