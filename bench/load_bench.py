"""Load: many sandboxes at once on this host, each running commands and file transfers for
a bounded time (issue 15).

    .venv/bin/python bench/load_bench.py [--namespaces 50] [--vms 8] [--seconds 60]

All sandboxes are created at once (``--create-threads`` callers), then every sandbox gets
its own caller thread that loops, until the time is up, over:

  run     commands.run(["sh", "-c", "echo $0"]) with a fresh token, output checked
  write   files.write of 64 KiB of fresh random bytes
  read    files.read of the same file, bytes compared

Then all are killed at once. Printed: errors per kind (target 0; the first few messages),
p50 / p99 latency per backend and operation, operations done, the load average at start
and end, and a cleanup check (no sandbox listed, no process of this run's MVM_HOME left).
Exit status 1 when there was any error or anything was left behind.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mvm

TEMPLATE = "python-3.13"
TRANSFER_BYTES = 64 * 1024
RESOURCES = {
    "namespace": mvm.resources(cpu_cores=0.1, memory_mb=128),
    "vm": mvm.resources(memory_mb=256),
}


class Tally:
    """Latencies and errors from every caller thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.errors: dict[tuple[str, str], list[str]] = defaultdict(list)

    def timed(self, backend: str, op: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # every failure is a finding, counted and printed
            with self.lock:
                self.errors[(backend, op)].append(f"{type(exc).__name__}: {exc}")
            return None
        with self.lock:
            self.latencies[(backend, op)].append(time.perf_counter() - start)
        return value

    def fail(self, backend: str, op: str, message: str) -> None:
        with self.lock:
            self.errors[(backend, op)].append(message)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def workload(sandbox: mvm.Sandbox, backend: str, deadline: float, tally: Tally) -> None:
    path = "/tmp/load-bench.bin"
    while time.monotonic() < deadline:
        token = secrets.token_hex(8)
        result = tally.timed(backend, "run", lambda token=token: sandbox.commands.run(["sh", "-c", "echo $0", token]))
        if result is not None and (result.exit_code != 0 or result.stdout.strip() != token):
            tally.fail(backend, "run", f"wrong result: exit {result.exit_code}, stdout {result.stdout[:80]!r}")
        data = secrets.token_bytes(TRANSFER_BYTES)
        if tally.timed(backend, "write", lambda data=data: sandbox.files.write(path, data)) is None:
            continue
        back = tally.timed(backend, "read", lambda: sandbox.files.read(path))
        if back is not None and back != data:
            tally.fail(backend, "read", f"read back {len(back)} bytes that differ from the {len(data)} written")


def parent_pid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def leftovers(root: Path) -> list[str]:
    """Processes whose command line or environment names this run's MVM_HOME (but this
    process's own zygote, which by design lives as long as its creator)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"mvm.supervisor.zygote" in cmdline and parent_pid(proc) == os.getpid():
            continue
        if str(root).encode() in cmdline or f"MVM_HOME={root}".encode() in environ:
            command = cmdline.replace(b"\0", b" ")[:120].decode(errors="replace")
            found.append(f"{proc.name}: {command}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--vms", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--create-threads", type=int, default=8)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mvm-load-", dir="/tmp"))
    os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
    os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
    os.environ["MVM_HOME"] = str(root)
    for backend in ("namespace", "vm"):  # templates built before anything is timed
        mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="5m", resources=RESOURCES[backend]).kill()

    tally = Tally()
    kinds = ["vm"] * args.vms + ["namespace"] * args.namespaces
    sandboxes: list[tuple[str, mvm.Sandbox]] = []
    load_start = os.getloadavg()[0]
    try:

        def create(backend: str) -> None:
            sandbox = tally.timed(
                backend,
                "create",
                lambda: mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="30m", resources=RESOURCES[backend]),
            )
            if sandbox is not None:
                with tally.lock:
                    sandboxes.append((backend, sandbox))

        started = time.perf_counter()
        with ThreadPoolExecutor(args.create_threads) as pool:
            list(pool.map(create, kinds))
        create_seconds = time.perf_counter() - started
        running = {backend: sum(1 for b, _ in sandboxes if b == backend) for backend in ("namespace", "vm")}
        load_created = os.getloadavg()[0]

        deadline = time.monotonic() + args.seconds
        workers = [threading.Thread(target=workload, args=(sb, backend, deadline, tally)) for backend, sb in sandboxes]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        load_end = os.getloadavg()[0]
    finally:
        started = time.perf_counter()
        with ThreadPoolExecutor(args.create_threads) as pool:
            list(pool.map(lambda pair: tally.timed(pair[0], "kill", pair[1].kill), sandboxes))
        kill_seconds = time.perf_counter() - started

    still_listed = [info.id for info in mvm.Sandbox.list()]
    for _ in range(50):  # processes leave within moments of kill(); give them up to 5 s
        left = leftovers(root)
        if not left:
            break
        time.sleep(0.1)
    if not still_listed and not left:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"{os.cpu_count()} cores; load average {load_start:.1f} at start, {load_created:.1f} with all created, "
        f"{load_end:.1f} at the end of the workload"
    )
    print(
        f"created {running['namespace']}/{args.namespaces} namespace + {running['vm']}/{args.vms} VM sandboxes "
        f"in {create_seconds:.1f} s ({args.create_threads} callers); workload {args.seconds:.0f} s; "
        f"killed in {kill_seconds:.1f} s"
    )
    print(f"{'backend':10} {'op':7} {'count':>7} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    keys = sorted(set(tally.latencies) | set(tally.errors))
    for backend, op in keys:
        samples = tally.latencies.get((backend, op), [])
        p50 = f"{statistics.median(samples) * 1000:9.1f}" if samples else f"{'-':>9}"
        p99 = f"{percentile(samples, 0.99) * 1000:9.1f}" if samples else f"{'-':>9}"
        print(f"{backend:10} {op:7} {len(samples):7d} {p50} {p99} {len(tally.errors.get((backend, op), [])):7d}")
    total_errors = sum(len(v) for v in tally.errors.values())
    print(f"errors: {total_errors}")
    for (backend, op), messages in sorted(tally.errors.items()):
        for message in sorted(set(messages))[:3]:
            print(f"  {backend} {op}: {message[:200]}")
    print(f"left behind: {len(still_listed)} listed sandboxes, {len(left)} processes")
    for line in left[:5]:
        print(f"  {line}")
    return 1 if total_errors or still_listed or left else 0


if __name__ == "__main__":
    sys.exit(main())
