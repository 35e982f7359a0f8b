"""Three Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head and two
worker raylets, each with its own resources), one ``MVM_HOME`` per node, and the mvm
node agents on them. Session-scoped: Ray starts once for the cluster tests.

Kept small for a shared 2-core host: one CPU per node, no dashboard, the smallest
object store Ray accepts. Key distribution: every node's ``keys/`` holds copies of the
test session's keys (signing key and snapshot key), as a real deployment would
provision them from a secret store (docs/scale-out.md); nothing else is shared
between the nodes' homes except the kernel cache (``MVM_CACHE``) and, for the first
two nodes, the read-only template cache (``MVM_TEMPLATES``, as in every test); the
third node starts with an empty template store of its own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster as RayCluster

from mvm.cluster import Cluster, NodeLimits, connect_cluster
from mvm.paths import keys_dir
from mvm.security.keys import host_signing_key
from mvm.snapshots import snapshot_key

OBJECT_STORE_BYTES = 80 * 1024 * 1024
#: Per-node limit the agents enforce in these tests.
MAX_SANDBOXES_PER_NODE = 4


@dataclass
class SimulatedCluster:
    ray_cluster: RayCluster
    nodes: list[str]  # node ids, head first
    homes: dict[str, Path]  # node id -> that node's MVM_HOME
    raylets: dict[str, object]  # node id -> ray._private.node.Node (for remove_node)
    mvm: Cluster
    max_sandboxes: int = MAX_SANDBOXES_PER_NODE


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[SimulatedCluster]:
    node_args = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = RayCluster(
        initialize_head=True,
        head_node_args={
            **node_args,
            "include_dashboard": False,
            # A removed node is declared dead in ~1.5 s instead of ~15 s.
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    raylets = [cluster.head_node] + [cluster.add_node(**node_args) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="mvm", logging_level="WARNING", log_to_driver=False)
    host_signing_key(), snapshot_key()  # the session's keys, copied to every node below
    root = Path(tempfile.mkdtemp(prefix="mvmr-", dir="/tmp"))
    homes: dict[str, Path] = {}
    for index, raylet in enumerate(raylets):
        home = root / f"n{index}"
        (home / "keys").mkdir(parents=True, mode=0o700)
        for key_file in keys_dir().iterdir():
            shutil.copy2(key_file, home / "keys" / key_file.name)
        homes[raylet.node_id] = home
    # The last node has a template store of its own, empty: it gets templates copied
    # from another node (tests/cluster/test_ray_cluster.py), as a fresh host would.
    last = raylets[-1].node_id
    handle = connect_cluster(
        None,
        strategy="spread",
        limits=NodeLimits(max_sandboxes=MAX_SANDBOXES_PER_NODE),
        node_homes={node: str(home) for node, home in homes.items()},
        node_env={last: {"MVM_TEMPLATES": str(homes[last] / "templates")}},
    )
    try:
        yield SimulatedCluster(cluster, [r.node_id for r in raylets], homes,
                               {r.node_id: r for r in raylets}, handle)
    finally:
        _destroy_everything(handle, homes)
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def _destroy_everything(handle: Cluster, homes: dict[str, Path]) -> None:
    """Kill what the tests left: through the agents where alive, else by the records'
    supervisor pids under the nodes' homes (ours only)."""
    from mvm.supervisor.state import load_record, reap

    try:
        for info in handle.list():
            if info.state != "lost":
                handle.connect(info.id).kill()
    except Exception:
        pass
    for home in homes.values():
        for directory in (home / "sandboxes").glob("sb-*"):
            reap(directory, load_record(directory))  # kills a live supervisor, cleans its backend
