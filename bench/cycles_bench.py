"""100 consecutive pause/resume/snapshot/restore cycles on one sandbox per backend,
state checked after each (tests/cycling.py, the same cycle the suite runs), and the
time per cycle: median, p90 and the last ten against the first ten (a cycle that got
slower as snapshots came and went would show as a ratio above 1).

    .venv/bin/python bench/cycles_bench.py [--backend vm|namespace ...] [--cycles 100]

Runs in a throw-away MVM_HOME.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
os.environ["MVM_HOME"] = tempfile.mkdtemp(prefix="mvmb-", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["MVM_HOME"], True)

from cycling import Cycler  # noqa: E402

import mvm  # noqa: E402


def run(backend: str, cycles: int) -> None:
    with mvm.Sandbox.create("python-3.13", backend=backend, ttl="2h") as sb:
        cycler = Cycler(sb)
        times = []
        for _ in range(cycles):
            start = time.monotonic()
            cycler.cycle()
            times.append(time.monotonic() - start)
    ordered = sorted(times)
    first, last = statistics.median(times[:10]), statistics.median(times[-10:])
    print(f"{backend:9} {cycles} cycles, state intact after each: total {sum(times):.1f} s, "
          f"per cycle median {statistics.median(times):.2f} s, p90 {ordered[int(len(ordered) * 0.9) - 1]:.2f} s, "
          f"last 10 / first 10 = {last / first:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=["vm", "namespace"])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    for backend in args.backend or ["namespace", "vm"]:
        run(backend, args.cycles)


if __name__ == "__main__":
    main()
