"""What a remote caller that stops reading costs the node agent (docs/scale-out.md, "Flow
control on the Ray hop"): a local one-node Ray cluster, a namespace sandbox created through
``mvm.connect_cluster``, a guest process writing ``--mib`` MiB to stdout. The caller takes
the first chunk and then reads nothing until the writer has made no progress for 1.5 s (or
``--stall-limit`` seconds passed). Prints how far the writer got and how much the node
agent's resident memory grew meanwhile, then the time to read the rest -- against the
baseline of the same flood read as it comes, in the same run. Both relays: a process's
output stream (``Process.output()``) and ``commands.run(on_stdout=...)``.

    .venv/bin/python bench/cluster_stalled_reader_bench.py [--mib 256]

Runs in a throw-away MVM_HOME (templates and caches shared with ~/.mvm); needs ``mvm[ray]``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
os.environ["MVM_HOME"] = tempfile.mkdtemp(prefix="mvmb-", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["MVM_HOME"], True)

import ray  # noqa: E402

import mvm  # noqa: E402
from mvm.protocol.requests import MAX_OUTPUT_LIMIT  # noqa: E402

MIB = 1024 * 1024


def flood_script(mib: int) -> str:
    """Prints "ready", waits for a line on stdin, writes ``mib`` MiB noting its progress."""
    return (
        "import os, sys\n"
        "out = sys.stdout.buffer\n"
        "open('/tmp/written', 'w').write('0')\n"
        "out.write(b'ready\\n'); out.flush()\n"
        "sys.stdin.readline()\n"
        f"for i in range({mib}):\n"
        "    out.write(b'y' * 1048575 + b'\\n'); out.flush()\n"
        "    open('/tmp/written.new', 'w').write(str(i + 1)); os.replace('/tmp/written.new', '/tmp/written')\n"
    )


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def held_by_ray() -> int:
    """Resident memory of this Ray session's own processes (raylet with its object store,
    GCS, ...) and of this caller, the consumer of the generator items."""
    node = ray._private.worker._global_node
    pids = {info.process.pid for infos in node.all_processes.values() for info in infos}
    return sum(rss(pid) for pid in pids | {os.getpid()})


def stall(sandbox: mvm.Sandbox, agent_pid: int, mib: int, limit: float) -> tuple[int, int, int]:
    """Read nothing until the writer stops (or ``limit`` s): (MiB written, agent RSS peak,
    peak of what Ray holds)."""
    peak, last, since, began = rss(agent_pid), -1, time.monotonic(), time.monotonic()
    ray_peak = held_by_ray()
    while time.monotonic() - began < limit:
        written = int(sandbox.files.read_text("/tmp/written"))
        peak = max(peak, rss(agent_pid))
        ray_peak = max(ray_peak, held_by_ray())
        if written != last:
            last, since = written, time.monotonic()
        elif time.monotonic() - since >= 1.5 or written == mib:
            break
        time.sleep(0.05)
    return last, peak, ray_peak


def through_output(sandbox: mvm.Sandbox, agent_pid: int, mib: int, limit: float, *, stalled: bool) -> str:
    process = sandbox.commands.start(["python3", "-c", flood_script(mib)], stdin=True)
    chunks = process.output()
    assert next(chunks) == ("stdout", "ready\n")
    before, ray_before = rss(agent_pid), held_by_ray()
    process.send_stdin("go\n")
    line = ""
    if stalled:
        written, peak, ray_peak = stall(sandbox, agent_pid, mib, limit)
        line = (f"writer got {written} of {mib} MiB; node agent RSS +{(peak - before) / MIB:.1f} MiB, "
                f"Ray's processes and the caller +{(ray_peak - ray_before) / MIB:.1f} MiB; ")
    started, received = time.monotonic(), 0
    for _, text in chunks:
        received += len(text)
    took = time.monotonic() - started
    assert received == mib * MIB, received
    process.wait(timeout=60)
    return line + f"read {mib} MiB in {took:.2f} s ({mib / took:.0f} MiB/s)"


def through_on_stdout(sandbox: mvm.Sandbox, agent_pid: int, mib: int, limit: float, *, stalled: bool) -> str:
    mib = min(mib, MAX_OUTPUT_LIMIT // MIB - 1)  # all of it captured, "ready" included
    resume, received = threading.Event(), [0]
    if not stalled:
        resume.set()

    def on_stdout(text: str) -> None:
        resume.wait()
        received[0] += len(text)

    before, ray_before = rss(agent_pid), held_by_ray()
    started = [time.monotonic()]
    caller = threading.Thread(target=lambda: sandbox.commands.run(
        ["python3", "-c", flood_script(mib)], stdin="go\n", on_stdout=on_stdout,
        max_output_bytes=(mib + 1) * MIB, timeout_seconds=900))
    caller.start()
    line = ""
    if stalled:
        written, peak, ray_peak = stall(sandbox, agent_pid, mib, limit)
        line = (f"writer got {written} of {mib} MiB; node agent RSS +{(peak - before) / MIB:.1f} MiB, "
                f"Ray's processes and the caller +{(ray_peak - ray_before) / MIB:.1f} MiB; ")
        started[0] = time.monotonic()
        resume.set()
    caller.join()
    took = time.monotonic() - started[0]
    assert received[0] == mib * MIB + len("ready\n"), received
    return line + f"read {mib} MiB in {took:.2f} s ({mib / took:.0f} MiB/s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--stall-limit", type=float, default=120.0)
    parser.add_argument("--way", choices=["output", "run", "both"], default="both",
                        help="one relay per run keeps the object store's pages of one out of the other's figures")
    args = parser.parse_args()
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * MIB, namespace="mvm",
             logging_level="WARNING", log_to_driver=False)
    try:
        cluster = mvm.connect_cluster(None)
        agent = cluster.agent(cluster.alive_nodes()[0])
        agent_pid = int(ray.get(agent.__ray_call__.remote(lambda _self: os.getpid())))
        with cluster.create("python-3.13", backend="namespace", ttl="15m") as sandbox:
            ways: dict[str, Callable[..., Any]] = {}
            if args.way in ("output", "both"):
                ways["Process.output()"] = through_output
            if args.way in ("run", "both"):
                ways["commands.run(on_stdout=...)"] = through_on_stdout
            for name, way in ways.items():
                print(f"cluster path, namespace, {args.mib} MiB of stdout, {name}:")
                print("  read as it comes (baseline): " + way(sandbox, agent_pid, args.mib, args.stall_limit,
                                                            stalled=False))
                print("  stalled reader: " + way(sandbox, agent_pid, args.mib, args.stall_limit, stalled=True))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
