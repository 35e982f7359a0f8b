"""A guest process that floods its stdout, and how to check what arrived (shared by the
stalled-reader tests: tests/supervisor/test_stream_backpressure.py on the local socket,
tests/cluster/test_ray_backpressure.py over the Ray hop)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

MIB = 1024 * 1024


def flood_script(mib: int) -> str:
    """Prints "ready", waits for a line on stdin, then writes ``mib`` distinct 1 MiB blocks
    (1 KiB lines), noting in /tmp/written how many the pipe took."""
    return f"""
import os, sys
out = sys.stdout.buffer
with open("/tmp/written", "w") as f:
    f.write("0")
out.write(b"ready\\n"); out.flush()
sys.stdin.readline()
for i in range({mib}):
    out.write(((f"{{i:015d}} " * 64)[:1023] + "\\n").encode() * 1024); out.flush()
    with open("/tmp/written.new", "w") as f:
        f.write(str(i + 1))
    os.replace("/tmp/written.new", "/tmp/written")
"""


def expected_digest(mib: int) -> str:
    """The SHA-256 of everything ``flood_script(mib)`` writes after "ready"."""
    digest = hashlib.sha256()
    for i in range(mib):
        digest.update(((f"{i:015d} " * 64)[:1023] + "\n").encode() * 1024)
    return digest.hexdigest()


def assert_all_arrived(chunks: Iterable[tuple[str, str]], mib: int) -> None:
    """Read the rest of a ``flood_script(mib)`` process's output: every byte, in order, on stdout."""
    digest, received = hashlib.sha256(), 0
    for stream, text in chunks:
        assert stream == "stdout"
        data = text.encode()
        digest.update(data)
        received += len(data)
    assert received == mib * MIB
    assert digest.hexdigest() == expected_digest(mib)


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
