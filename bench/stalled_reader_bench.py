"""What a reader that stops reading a process's output costs, on both hops a stream takes:
``local``, the SDK talking to the sandbox's supervisor (docs/reliability.md, "A reader that
stops reading"), and ``cluster``, the same through ``mvm.connect_cluster`` and the node
agent's Ray hop on a private one-node Ray cluster (docs/scale-out.md, "Flow control on the
Ray hop"). A guest process writes ``--mib`` MiB to stdout; the caller takes the first chunk,
then reads nothing until the writer has made no progress for 1.5 s (or ``--stall-limit`` s
passed). Prints how far the writer got and how much the resident memory of the processes
that could pile the flood up grew meanwhile (local: the client, this process, and the
supervisor; cluster: the node agent, and Ray's own processes with the caller), then the time
to read the rest -- against the baseline of the same flood read as it comes, in the same
run; with both hops, the cluster's baseline against the local one. Two relays: a process's
output stream (``Process.output()``) and ``commands.run(on_stdout=...)`` -- which also
captures all of it for its result, so its peak growth while reading is that capture
(client and supervisor; on the cluster hop, the caller), not a queue.

    .venv/bin/python bench/stalled_reader_bench.py              # --hop both --way both --mib 256
    .venv/bin/python bench/stalled_reader_bench.py --hop local --way output

Runs in a throw-away MVM_HOME (templates and caches shared with ~/.mvm), namespace backend;
the cluster hop needs ``mvm[ray]``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
os.environ["MVM_HOME"] = tempfile.mkdtemp(prefix="mvmb-", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["MVM_HOME"], True)

import mvm  # noqa: E402
from mvm.protocol.requests import MAX_OUTPUT_LIMIT  # noqa: E402

MIB = 1024 * 1024
STALLED_FOR = 1.5  # seconds without progress that count as "the writer is blocked"


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


@dataclass
class Hop:
    """One way to a sandbox, and the processes whose memory a stalled reader could fill there."""
    name: str
    sandbox: mvm.Sandbox
    watched: dict[str, Callable[[], int]]  # label -> its resident bytes now


class Peaks:
    """The peak of each watched process's RSS since ``started``, sampled every 50 ms by a
    thread of its own (the reader never pauses to look)."""

    def __init__(self, watched: dict[str, Callable[[], int]]) -> None:
        self.watched = watched
        self.base = self._now()
        self.peak = dict(self.base)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _now(self) -> dict[str, int]:
        return {label: resident() for label, resident in self.watched.items()}

    def sample(self) -> None:
        now = self._now()
        with self._lock:
            self.peak = {label: max(self.peak[label], now[label]) for label in now}

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def growth(self) -> str:
        self.sample()
        with self._lock:
            return ", ".join(f"{label} +{(self.peak[label] - self.base[label]) / MIB:.1f} MiB"
                             for label in self.watched)

    @contextmanager
    def started(self) -> Iterator[Peaks]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


@dataclass
class Flood:
    """A flood of ``mib`` MiB on its way to the caller by one relay: ``begin`` lets the writer
    go; the caller reads nothing of it until ``read_rest``, which reads to the end and checks
    that every byte arrived."""
    mib: int
    begin: Callable[[], None]
    read_rest: Callable[[], None]


def through_output(sandbox: mvm.Sandbox, mib: int) -> Flood:
    """``Process.output()``: the caller simply does not iterate the stream."""
    process = sandbox.commands.start(["python3", "-c", flood_script(mib)], stdin=True)
    chunks = process.output()
    assert next(chunks) == ("stdout", "ready\n")

    def read_rest() -> None:
        received = sum(len(text) for _, text in chunks)
        assert received == mib * MIB, received
        process.wait(timeout=60)

    return Flood(mib, lambda: process.send_stdin("go\n"), read_rest)


def through_on_stdout(sandbox: mvm.Sandbox, mib: int) -> Flood:
    """``commands.run(on_stdout=...)``: the caller's callback blocks until ``read_rest``."""
    mib = min(mib, MAX_OUTPUT_LIMIT // MIB - 1)  # all of it captured, "ready" included
    resume, received = threading.Event(), [0]

    def on_stdout(text: str) -> None:
        resume.wait()
        received[0] += len(text)

    caller = threading.Thread(target=lambda: sandbox.commands.run(
        ["python3", "-c", flood_script(mib)], stdin="go\n", on_stdout=on_stdout,
        max_output_bytes=(mib + 1) * MIB, timeout_seconds=900))

    def read_rest() -> None:
        resume.set()
        caller.join()
        assert received[0] == mib * MIB + len("ready\n"), received

    return Flood(mib, caller.start, read_rest)


WAYS: dict[str, Callable[[mvm.Sandbox, int], Flood]] = {
    "output": through_output,
    "run": through_on_stdout,
}
WAY_NAMES = {"output": "Process.output()", "run": "commands.run(on_stdout=...)"}


def wait_until_stalled(sandbox: mvm.Sandbox, mib: int, limit: float) -> int:
    """Read nothing until the writer made no progress for ``STALLED_FOR`` s (or ``limit`` s
    passed, or it wrote everything): the MiB it wrote."""
    last, since, began = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - began < limit:
        written = int(sandbox.files.read_text("/tmp/written"))
        if written != last:
            last, since = written, time.monotonic()
        elif time.monotonic() - since >= STALLED_FOR or written == mib:
            break
        time.sleep(0.05)
    return last


def measure(hop: Hop, way: str, mib: int, limit: float, *, stalled: bool) -> tuple[float, str]:
    """One flood through ``hop`` by ``way``, read as it comes or by a reader that stalls
    first: (seconds to read it, after the stall if any; the printed line)."""
    flood = WAYS[way](hop.sandbox, mib)
    line = ""
    with Peaks(hop.watched).started() as peaks:
        started = time.monotonic()
        flood.begin()
        if stalled:
            written = wait_until_stalled(hop.sandbox, flood.mib, limit)
            line = (f"the writer got {written} of {flood.mib} MiB; RSS growth while stalled: {peaks.growth()}\n"
                    "  then read the rest: ")
            started = time.monotonic()
        flood.read_rest()
        took = time.monotonic() - started
        line += f"{flood.mib} MiB in {took:.2f} s ({flood.mib / took:.0f} MiB/s); RSS peak growth: {peaks.growth()}"
    return took, line


def measure_hop(hop: Hop, ways: list[str], mib: int, limit: float) -> dict[str, float]:
    """Prints the baseline and the stalled reader of each way: the baselines' seconds."""
    baselines = {}
    for way in ways:
        print(f"{hop.name} hop, namespace, {mib} MiB of stdout, {WAY_NAMES[way]}:")
        baselines[way], line = measure(hop, way, mib, limit, stalled=False)
        print(f"  read as it comes (baseline): {line}")
        took, line = measure(hop, way, mib, limit, stalled=True)
        print(f"  stalled reader: {line} -- {took / baselines[way]:.2f}x the baseline's time")
    return baselines


def local_hop(ways: list[str], mib: int, limit: float) -> dict[str, float]:
    with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="15m") as sandbox:
        supervisor = int(sandbox.describe().details["supervisor_pid"])
        client = os.getpid()
        return measure_hop(Hop("local", sandbox, {"client": lambda: rss(client),
                                                  "supervisor": lambda: rss(supervisor)}), ways, mib, limit)


def cluster_hop(ray: ModuleType, ways: list[str], mib: int, limit: float) -> dict[str, float]:
    # address="local": a cluster of its own, never one another program has running here
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 * MIB, namespace="mvm",
             logging_level="WARNING", log_to_driver=False)
    try:
        node = ray._private.worker._global_node
        caller = os.getpid()

        def held_by_ray() -> int:
            """Resident memory of this Ray session's own processes (raylet with its object
            store, GCS, ...) and of this caller, the consumer of the generator items."""
            pids = {info.process.pid for infos in node.all_processes.values() for info in infos}
            return sum(rss(pid) for pid in pids | {caller})

        cluster = mvm.connect_cluster(None)
        agent = cluster.agent(cluster.alive_nodes()[0])
        agent_pid = int(ray.get(agent.__ray_call__.remote(lambda _self: os.getpid())))
        with cluster.create("python-3.13", backend="namespace", ttl="15m") as sandbox:
            watched = {"node agent": lambda: rss(agent_pid), "Ray's processes and the caller": held_by_ray}
            return measure_hop(Hop("cluster", sandbox, watched), ways, mib, limit)
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--stall-limit", type=float, default=120.0)
    parser.add_argument("--hop", choices=["local", "cluster", "both"], default="both")
    parser.add_argument("--way", choices=["output", "run", "both"], default="both",
                        help="one relay per run keeps the object store's pages of one out of the other's "
                             "cluster figures")
    args = parser.parse_args()
    ways = ["output", "run"] if args.way == "both" else [args.way]
    ray: ModuleType | None = None
    if args.hop in ("cluster", "both"):
        try:  # (an optional extra: asked for before the local hop's figures take their time)
            ray = importlib.import_module("ray")
        except ImportError:
            parser.error("the cluster hop needs Ray: pip install 'mvm[ray]' (or --hop local)")
    local = local_hop(ways, args.mib, args.stall_limit) if args.hop in ("local", "both") else {}
    remote = cluster_hop(ray, ways, args.mib, args.stall_limit) if ray is not None else {}
    if local and remote:
        print("cluster hop against the local hop, read as it comes: "
              + "; ".join(f"{WAY_NAMES[way]} {remote[way] / local[way]:.2f}x the local time" for way in ways))
    return 0


if __name__ == "__main__":
    sys.exit(main())
