"""Runs the TypeScript SDK's own test suite (`npm test` in sdks/typescript: build, then
Node's test runner against real namespace sandboxes and one microVM), so the README's
single test command covers it. Fails when any TypeScript test fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ts_helpers import mvmctl_env


def test_npm_test_passes(ts_sdk: Path) -> None:
    npm = shutil.which("npm")
    assert npm is not None
    done = subprocess.run([npm, "test", "--prefix", str(ts_sdk)], capture_output=True, text=True, timeout=900,
                          env=mvmctl_env())
    output = done.stdout + done.stderr
    summary = "\n".join(line for line in output.splitlines() if line.startswith(("# tests", "# pass", "# fail")))
    failures = "\n".join(line for line in output.splitlines() if "not ok" in line)
    assert done.returncode == 0, (f"npm test failed (exit {done.returncode}):\n{summary}\n{failures}\n"
                                  f"--- last output ---\n{output[-6000:]}")
    assert "# fail 0" in output, output[-3000:]
