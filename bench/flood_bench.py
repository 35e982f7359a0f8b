"""A 1 GiB stdout flood on each backend: through ``commands.run`` (captured up to its cap,
the rest counted and dropped), through the streaming path (``Process.output()``, every
byte delivered), against the same flood written to ``/dev/null`` inside the guest (the
baseline: what the guest itself costs); and a neighbour sandbox's ``commands.run``
latency, idle and while the capped flood runs.

    .venv/bin/python bench/flood_bench.py [--backend vm|namespace ...] [--mib 1024]

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
import threading
import time
from pathlib import Path

os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
os.environ["MVM_HOME"] = tempfile.mkdtemp(prefix="mvmb-", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["MVM_HOME"], True)

import mvm  # noqa: E402


def _timed(fn: object) -> float:
    start = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - start


def _neighbour_latencies(neighbour: mvm.Sandbox, until: threading.Event | None, count: int = 20) -> list[float]:
    times = []
    while len(times) < count or (until is not None and not until.is_set()):
        times.append(_timed(lambda: neighbour.commands.run(["true"])))
        if until is not None and until.is_set():
            break
    return times


def run(backend: str, mib: int) -> None:
    size = mib * 1024 * 1024
    flood = f"yes | head -c {size}"
    with mvm.Sandbox.create("python-3.13", backend=backend, ttl="2h") as flooder, \
            mvm.Sandbox.create("python-3.13", backend=backend, ttl="2h") as neighbour:
        baseline = _timed(lambda: flooder.commands.run(f"{flood} > /dev/null", timeout_seconds=None))

        idle = _neighbour_latencies(neighbour, None)
        done = threading.Event()
        result: list[mvm.CommandResult] = []

        def capped_run() -> None:
            try:
                result.append(flooder.commands.run(flood, timeout_seconds=None))
            finally:
                done.set()

        start = time.monotonic()
        thread = threading.Thread(target=capped_run)
        thread.start()
        busy = _neighbour_latencies(neighbour, done, count=1)
        thread.join()
        capped = time.monotonic() - start
        assert result and result[0].truncated and result[0].stdout_bytes == size, result

        def streamed() -> None:
            process = flooder.commands.start(["sh", "-c", f"echo ready; read go; {flood}"], stdin=True)
            chunks = process.output()
            assert next(chunks) == ("stdout", "ready\n")  # attached: let the flood go
            process.send_stdin("go\n")
            received = sum(len(text) for _stream, text in chunks)
            assert received == size, received

        streaming = _timed(streamed)

    def rate(seconds: float) -> str:
        return f"{seconds:6.1f} s {mib / seconds:6.1f} MiB/s"

    print(f"{backend:9} {mib} MiB to /dev/null in the guest (baseline): {rate(baseline)}")
    print(f"{backend:9} {mib} MiB through commands.run (capped at 4 MiB): {rate(capped)}, "
          f"{capped / baseline:.2f}x the baseline")
    print(f"{backend:9} {mib} MiB through Process.output() (every byte):  {rate(streaming)}, "
          f"{streaming / baseline:.2f}x the baseline")
    print(f"{backend:9} neighbour commands.run median: idle {statistics.median(idle) * 1000:.0f} ms, "
          f"during the flood {statistics.median(busy) * 1000:.0f} ms ({len(busy)} runs), "
          f"{statistics.median(busy) / statistics.median(idle):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=["vm", "namespace"])
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    for backend in args.backend or ["namespace", "vm"]:
        run(backend, args.mib)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
