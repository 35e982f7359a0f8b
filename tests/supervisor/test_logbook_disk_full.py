"""The sandbox log on a full disk (a 256 KiB tmpfs made by the test as MVM_HOME would be):
writes never raise into the supervisor (they ran on the agent link's reader, and an
exception there cost the sandbox its agent), lines are dropped and counted, and the count
is logged once the disk has room again."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.supervisor.logbook import LogBook


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_drops_log_lines_and_says_how_many(tiny_fs: Path) -> None:
    book = LogBook(tiny_fs / "logs.jsonl")
    ballast = tiny_fs / "ballast"
    with open(ballast, "wb", buffering=0) as fh:  # fill the rest of the disk
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    for n in range(200):
        book.write("process:7", "stdout", f"line {n} " + "x" * 200)  # must not raise
    ballast.unlink()
    book.write("supervisor", "system", "room again")
    entries = book.read()
    messages = [e["message"] for e in entries]
    assert messages[-1] == "room again"
    dropped = [m for m in messages if m.endswith("log lines were dropped: the log could not be written")]
    assert len(dropped) == 1
    kept = sum(1 for m in messages if m.startswith("line "))
    assert int(dropped[0].split()[0]) + kept >= 199  # every line is either there or counted (one may be torn)
    book.close()
