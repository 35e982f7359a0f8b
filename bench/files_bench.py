"""64 MiB ``files.write`` + ``files.read`` against a local copy, with the CPU time it costs.

    .venv/bin/python bench/files_bench.py [--backend namespace|vm] [--runs N] [--mib 64]

Wall time depends on the host's load; CPU time per MiB (client + supervisor + the
sandbox's processes: bwrap, the agent and the children it reaped) does not, so both are
printed. The write is measured twice in the same run, interleaved: with the SDK's window
of chunks in flight (``WRITE_WINDOW``) and with a window of one (each chunk waits for its
answer, as before pipelining) -- an A/B of the same code on the same load. A read as a
guest user (``user="nobody"``) beside the same read as root shows what acting as the user
costs (one child forked per read: the file stays open between chunks). Issue 14's
target: write + read within 3x the local copy + read.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mvm
from mvm.sdk import files as sdk_files

TEMPLATE = "python-3.13"
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pids: list[int]) -> float:
    """CPU seconds of ``pids`` (with their reaped children) and of this process."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / TICKS  # utime stime cutime cstime
    own = resource.getrusage(resource.RUSAGE_SELF)
    return total + own.ru_utime + own.ru_stime


def measure(fn: Callable[[], object], pids: list[int]) -> tuple[float, float]:
    cpu, start = process_cpu(pids), time.perf_counter()
    fn()
    return time.perf_counter() - start, process_cpu(pids) - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default=os.environ.get("MVM_BACKEND", "namespace"))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--mib", type=int, default=64)
    ns = parser.parse_args()
    data = os.urandom(ns.mib << 20)
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "src.bin"
    src.write_bytes(data)
    window = sdk_files.WRITE_WINDOW
    samples: dict[str, list[tuple[float, float]]] = {}

    with mvm.Sandbox.create(TEMPLATE, backend=ns.backend, ttl="10m", resources=mvm.resources(memory_mb=1024)) as sb:
        details = sb.describe().details
        pids = [int(details["supervisor_pid"]), *map(int, details.get("host_pids", []))]

        def write(size: int) -> Callable[[], object]:
            def run() -> None:
                sdk_files.WRITE_WINDOW = size
                try:
                    sb.files.write("/tmp/bench.bin", data)
                finally:
                    sdk_files.WRITE_WINDOW = window
            return run

        def read() -> None:
            assert len(sb.files.read("/tmp/bench.bin", max_bytes=len(data))) == len(data)

        def read_as_nobody() -> None:
            assert len(sb.files.read("/tmp/bench.bin", max_bytes=len(data), user="nobody")) == len(data)

        def local() -> None:
            shutil.copyfile(src, tmp / "dst.bin")
            assert len((tmp / "dst.bin").read_bytes()) == len(data)

        write(window)()  # warm up
        read()
        for _ in range(ns.runs):  # interleaved: every variant sees the same load
            for label, fn in ((f"files.write, window {window}", write(window)), ("files.write, window 1", write(1)),
                              ("files.read (streamed)", read), ('files.read, user="nobody"', read_as_nobody),
                              ("local copy + read", local)):
                samples.setdefault(label, []).append(measure(fn, pids if fn is not local else []))
    shutil.rmtree(tmp)

    def median(label: str, index: int) -> float:
        return statistics.median(s[index] for s in samples[label])

    print(f"backend={ns.backend} {ns.mib} MiB runs={ns.runs} loadavg={Path('/proc/loadavg').read_text().split()[:3]}")
    print("| measurement | wall (median) | CPU ms per MiB (median) |")
    print("|---|---|---|")
    for label in samples:
        print(f"| {label} | {median(label, 0) * 1000:.0f} ms | {median(label, 1) * 1000 / ns.mib:.2f} |")
    base = median("local copy + read", 0)
    new = median(f"files.write, window {window}", 0) + median("files.read (streamed)", 0)
    old = median("files.write, window 1", 0) + median("files.read (streamed)", 0)
    print(f"write+read / local copy+read: {new / base:.2f}x with the window, {old / base:.2f}x with a window of 1"
          " (target <= 3x)")


if __name__ == "__main__":
    main()
