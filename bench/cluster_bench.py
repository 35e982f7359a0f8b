"""The cluster path (Ray, three simulated nodes on this machine) against the plain SDK on
one host, in the same run.

    .venv/bin/python bench/cluster_bench.py [--sandboxes 100] [--threads 4] [--runs 200]

Rows:
  create N namespace sandboxes   plain SDK on this host vs mvm.connect_cluster across 3
                                 nodes (placement "spread"), both with --threads callers
  destroy N-1                    the same (one of each is kept for the next row)
  commands.run(["true"])         median per call on one sandbox: local socket vs relayed
                                 through the owning node's agent (Ray actor call + streaming)
The three nodes share this machine's cores, so the create row shows the cluster path's
overhead, not a scale-out speed-up (that needs real hosts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mvm

TEMPLATE = "python-3.13"
RESOURCES = mvm.resources(cpu_cores=0.1, memory_mb=128)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def create_all(make: Callable[[int], mvm.Sandbox], count: int, threads: int) -> tuple[float, list[mvm.Sandbox]]:
    with ThreadPoolExecutor(threads) as pool:
        return timed(lambda: list(pool.map(make, range(count))))


def destroy_all(sandboxes: list[mvm.Sandbox], threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        seconds, _ = timed(lambda: list(pool.map(lambda sb: sb.kill(), sandboxes)))
    return seconds


def per_call(local: mvm.Sandbox, remote: mvm.Sandbox, runs: int) -> tuple[float, float]:
    """Medians of commands.run(["true"]) on each, calls alternated so load drifts hit both."""
    samples: dict[str, list[float]] = {"local": [], "remote": []}
    for index in range(runs + 10):
        for label, sandbox in (("local", local), ("remote", remote)):
            start = time.perf_counter()
            sandbox.commands.run(["true"])
            if index >= 10:  # warm-up
                samples[label].append(time.perf_counter() - start)
    return statistics.median(samples["local"]), statistics.median(samples["remote"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sandboxes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster as RayCluster

    from mvm.cluster import connect_cluster

    root = Path(tempfile.mkdtemp(prefix="mvmb-", dir="/tmp"))
    os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
    os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
    os.environ["MVM_HOME"] = str(root / "local")
    mvm.Sandbox.create(TEMPLATE, backend="namespace", ttl="5m").kill()  # template ready, zygote warm

    node_args = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
    ray_cluster = RayCluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    raylets = [ray_cluster.head_node] + [ray_cluster.add_node(**node_args) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    ray.init(address=ray_cluster.address, namespace="mvm", logging_level="WARNING", log_to_driver=False)
    homes = {r.node_id: str(root / f"n{i}") for i, r in enumerate(raylets)}
    cluster = connect_cluster(None, strategy="spread", node_homes=homes)
    try:
        print(f"load average at start: {os.getloadavg()[0]:.2f}  ({os.cpu_count()} cores)")
        local_create, local = create_all(
            lambda i: mvm.Sandbox.create(TEMPLATE, backend="namespace", ttl="30m", resources=RESOURCES),
            args.sandboxes, args.threads,
        )
        kept_local = local.pop()
        local_destroy = destroy_all(local, args.threads)

        cluster_create, remote = create_all(
            lambda i: cluster.create(TEMPLATE, backend="namespace", ttl="30m", resources=RESOURCES),
            args.sandboxes, args.threads,
        )
        per_node: dict[str, int] = {}
        for info in cluster.list():
            per_node[info.details["node_id"][:8]] = per_node.get(info.details["node_id"][:8], 0) + 1
        kept_remote = remote.pop()
        assert type(kept_remote._client()).__name__ == "ClusterTransport"
        local_call, cluster_call = per_call(kept_local, kept_remote, args.runs)
        kept_local.kill()
        kept_remote.kill()
        cluster_destroy = destroy_all(remote, args.threads)

        n = args.sandboxes
        print(f"{'row':34} {'local':>12} {'cluster':>12} {'ratio':>7}")
        print(f"{f'create {n} (threads={args.threads})':34} {local_create:11.2f}s {cluster_create:11.2f}s "
              f"{cluster_create / local_create:6.2f}x")
        print(f"{'  per sandbox':34} {local_create / n * 1000:10.1f}ms {cluster_create / n * 1000:10.1f}ms")
        print(f"{f'destroy {n - 1}':34} {local_destroy:11.2f}s {cluster_destroy:11.2f}s "
              f"{cluster_destroy / local_destroy:6.2f}x")
        print(f"{'commands.run([true]) median':34} {local_call * 1000:10.2f}ms {cluster_call * 1000:10.2f}ms "
              f"{cluster_call / local_call:6.2f}x  (+{(cluster_call - local_call) * 1000:.2f} ms per op)")
        print(f"placement (spread) per node: {per_node}")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    finally:
        ray.shutdown()
        ray_cluster.shutdown()
        from mvm.supervisor.state import load_record, reap

        for directory in root.glob("*/sandboxes/sb-*"):
            reap(directory, load_record(directory))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
