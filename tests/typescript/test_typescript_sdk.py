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
    assert done.returncode == 0, (f"npm test failed (exit {done.returncode}):\n{summary}\n{_failures(output)}\n"
                                  f"--- last output ---\n{output[-3000:]}")
    assert "# fail 0" in output, output[-3000:]


def _failures(output: str, most_lines: int = 80) -> str:
    """Each failed test's TAP lines: its ``not ok`` line and the diagnostics under it (the
    error, expected and actual, the stack) up to the block's ``...``."""
    blocks: list[str] = []
    lines = output.splitlines()
    for at, line in enumerate(lines):
        if "not ok" not in line:
            continue
        block = [line]
        for following in lines[at + 1 : at + most_lines]:
            block.append(following)
            if following.strip() == "...":
                break
        blocks.append("\n".join(block))
    return "\n".join(blocks)
