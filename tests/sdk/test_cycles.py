"""Consecutive pause/resume/snapshot/restore cycles lose nothing (tests/cycling.py):
100 on namespaces; on a TCG VM each cycle writes and reads a memory image, so the
suite does a few and ``bench/cycles_bench.py`` does 100 and prints the figures."""

from __future__ import annotations

from cycling import Cycler

import mvm

CYCLES = {"namespace": 100, "vm": 5}


def test_consecutive_cycles_lose_no_state(backend: str) -> None:
    with mvm.Sandbox.create("python-3.13", backend=backend, ttl="30m") as sb:
        cycler = Cycler(sb)
        for _ in range(CYCLES[backend]):
            cycler.cycle()
        assert cycler.done == CYCLES[backend]
