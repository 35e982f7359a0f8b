"""The cluster path on three Ray nodes (tests/cluster/conftest.py): placement, routing
from any process, the relayed data path, limits, TTLs, snapshots moving between nodes,
and a node dying mid-run. The node-death test removes a node, so it runs last."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import ray

import mvm
from mvm import errors
from mvm.backends import availability
from mvm.cluster import Cluster
from mvm.osutil import pid_alive
from mvm.supervisor.state import load_record

from waiting import wait_for

if TYPE_CHECKING:
    from conftest import SimulatedCluster

TEMPLATE = "python-3.13"
BACKENDS = [name for name in ("namespace", "vm") if availability(name).ok] or ["namespace"]


def _node_of(sim: SimulatedCluster, sandbox: mvm.Sandbox) -> str:
    """Which node's MVM_HOME holds the sandbox's records (the ground truth, on disk)."""
    owners = [node for node, home in sim.homes.items() if (home / "sandboxes" / sandbox.id / "state.json").exists()]
    assert len(owners) == 1, owners
    return owners[0]


def test_every_node_runs_an_agent_reporting_its_own_home(ray_cluster: SimulatedCluster) -> None:
    reports = ray_cluster.mvm.reports()
    assert sorted(r.node_id for r in reports) == sorted(ray_cluster.nodes)
    for report in reports:
        assert report.home == str(ray_cluster.homes[report.node_id])
        assert "namespace" in report.backends
        assert report.max_sandboxes == ray_cluster.max_sandboxes
        assert report.cpu_limit > 0 and report.memory_limit_mb > 0


def test_a_node_without_the_template_gets_it_copied_not_built(ray_cluster: SimulatedCluster) -> None:
    sim = ray_cluster
    fresh = sim.nodes[2]
    reports = {r.node_id: r for r in sim.mvm.reports()}
    assert TEMPLATE in reports[sim.nodes[0]].templates and TEMPLATE not in reports[fresh].templates
    # locality puts the nodes holding it first
    sb = sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", placement="locality")
    with sb:
        assert _node_of(sim, sb) != fresh
    # a create pinned to the fresh node copies the build from a holder, agent to agent
    with sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", node=fresh) as sb:
        assert sb.commands.run(["python3", "-c", "print(6 * 7)"]).stdout == "42\n"
    copied = sim.homes[fresh] / "templates" / _current_key()
    assert (copied / "manifest.json").read_bytes() == (
        Path(os.environ["MVM_TEMPLATES"]) / _current_key() / "manifest.json"
    ).read_bytes()
    assert not list(copied.glob("*.ext4"))  # the disks derived from the rootfs stay on their node
    assert TEMPLATE in {r.node_id: r for r in sim.mvm.reports()}[fresh].templates
    again = sim.mvm.copy_template(TEMPLATE, source=sim.nodes[0], target=fresh)
    assert again["already"] is True


def _current_key() -> str:
    from mvm.templates import store
    from mvm.templates.builder import current_digest
    from mvm.templates.catalog import recipe

    return store.template_key(TEMPLATE, current_digest(recipe(TEMPLATE)))


def test_spread_places_on_every_node_and_the_same_sandbox_api_works(ray_cluster: SimulatedCluster) -> None:
    sim = ray_cluster
    sandboxes = [
        mvm.Sandbox.create(TEMPLATE, backend="namespace", ttl="10m", cluster=sim.mvm, name=f"spread-{i}")
        for i in range(3)
    ]
    try:
        assert all(type(sb) is mvm.Sandbox for sb in sandboxes)
        assert sorted(_node_of(sim, sb) for sb in sandboxes) == sorted(sim.nodes)
        sb = sandboxes[1]
        big = os.urandom(9 * 1024 * 1024 + 5)  # two windows of chunks through the relay
        sb.files.write("/tmp/big.bin", big)
        assert sb.files.read("/tmp/big.bin") == big
        lines: list[str] = []
        result = sb.commands.run(["sh", "-c", "echo out; echo err >&2; exit 3"], on_stdout=lines.append)
        assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
        assert "".join(lines) == "out\n"
        process = sb.commands.start(["sh", "-c", "for i in 1 2 3; do echo line$i; done"])
        assert list(process.stdout) == ["line1\n", "line2\n", "line3\n"]  # a relayed stream
        assert process.wait() == 0
        logs = [event.message for event in sb.logs(follow=False)]
        assert any("line2" in message for message in logs)
        with pytest.raises(errors.FileNotFoundInSandbox):
            sb.files.read("/no/such/file")
        listed = {info.id: info for info in mvm.Sandbox.list(cluster=sim.mvm)}
        for made in sandboxes:
            assert listed[made.id].details["node_id"] == _node_of(sim, made)
            assert listed[made.id].state == "running"
    finally:
        for sb in sandboxes:
            sb.kill()
    remaining = {info.id for info in sim.mvm.list()}
    assert not remaining & {sb.id for sb in sandboxes}


def test_an_id_routes_to_its_node_from_another_process_on_another_node(ray_cluster: SimulatedCluster) -> None:
    sim = ray_cluster
    with sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", node=sim.nodes[2]) as sb:
        sb.files.write("/tmp/greeting", "hello from node 2")

        @ray.remote(num_cpus=0)
        def read_elsewhere(sandbox_id: str) -> tuple[str, str]:
            fresh = Cluster()  # a new handle: no routes learned, finds the node by asking
            remote = mvm.Sandbox.connect(sandbox_id, cluster=fresh)
            return ray.get_runtime_context().get_node_id(), remote.files.read("/tmp/greeting").decode()

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        where, text = ray.get(
            read_elsewhere.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(sim.nodes[1], soft=False)
            ).remote(sb.id)
        )
        assert (where, text) == (sim.nodes[1], "hello from node 2")
        by_name = mvm.Sandbox.connect(sb.name, cluster=Cluster())
        assert by_name.id == sb.id
    with pytest.raises(errors.SandboxNotFound):
        mvm.Sandbox.connect(sb.id, cluster=Cluster())


def test_a_separate_driver_connects_with_auto_and_reaches_the_sandbox(ray_cluster: SimulatedCluster) -> None:
    """Another Python process (not a Ray worker) joins with connect_cluster("auto")."""
    import subprocess
    import sys

    sim = ray_cluster
    with sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", node=sim.nodes[1]) as sb:
        script = (
            "import sys, mvm\n"
            "cluster = mvm.connect_cluster('auto')\n"
            "ids = [info.id for info in mvm.Sandbox.list(cluster=cluster)]\n"
            "sb = mvm.Sandbox.connect(sys.argv[1], cluster=cluster)\n"
            "print(sys.argv[1] in ids, sb.commands.run(['echo', 'hi']).stdout.strip())\n"
        )
        env = {**os.environ, "RAY_ADDRESS": sim.ray_cluster.address}
        run = subprocess.run([sys.executable, "-c", script, sb.id], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == ["True", "hi"]


def test_per_node_limits_hold_and_a_full_cluster_says_why(ray_cluster: SimulatedCluster) -> None:
    sim = ray_cluster
    node = sim.nodes[1]
    made = []
    try:
        for _ in range(sim.max_sandboxes):
            made.append(sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", node=node))
        with pytest.raises(errors.NoCapacity, match=f"max_sandboxes={sim.max_sandboxes}"):
            sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", node=node)
        # pack now skips the full node and fills the next one
        packed = [sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", placement="pack") for _ in range(2)]
        made += packed
        assert len({_node_of(sim, sb) for sb in packed}) == 1 and _node_of(sim, packed[0]) != node
        before = {info.id for info in sim.mvm.list()}
        with pytest.raises(errors.NoCapacity) as caught:
            sim.mvm.create(TEMPLATE, backend="namespace", resources=mvm.resources(memory_mb=262144))
        assert all(n[:12] in caught.value.message for n in sim.nodes)
        assert {info.id for info in sim.mvm.list()} == before  # nothing half-made
        with pytest.raises(errors.InvalidArgument, match="placement"):
            sim.mvm.create(TEMPLATE, placement="random")
        with pytest.raises(errors.InvalidArgument, match="mode"):
            sim.mvm.create(TEMPLATE, mode="record")
    finally:
        for sb in made:
            sb.kill()


def test_ttl_is_enforced_by_the_owning_node(ray_cluster: SimulatedCluster) -> None:
    sim = ray_cluster
    sb = sim.mvm.create(TEMPLATE, backend="namespace", ttl=2, node=sim.nodes[2])
    assert sb.id in {info.id for info in sim.mvm.list()}
    wait_for(lambda: sb.id not in {info.id for info in sim.mvm.list()}, timeout=60, what="TTL expiry on node 2")
    with pytest.raises(errors.MvmError):
        sb.commands.run(["true"])


def test_on_behalf_of_auto_pause_and_idle_timeout_hold_on_the_cluster_path(ray_cluster: SimulatedCluster) -> None:
    """The create options and read timeouts of a local sandbox hold for a cluster one too."""
    import json

    sim = ray_cluster
    with pytest.raises(errors.InvalidArgument) as bad:
        mvm.Sandbox.create(TEMPLATE, backend="namespace", cluster=sim.mvm, on_behalf_of={"client": 7})
    assert bad.value.field == "on_behalf_of"
    with pytest.raises(errors.InvalidArgument) as bad:
        mvm.Sandbox.create(TEMPLATE, backend="namespace", cluster=sim.mvm, auto_pause="soon")
    assert bad.value.field == "auto_pause"
    principal = {"client": "cluster-caller", "via": "test"}
    with mvm.Sandbox.create(TEMPLATE, backend="namespace", ttl="10m", cluster=sim.mvm, on_behalf_of=principal,
                            auto_pause="10m") as sb:
        assert sb.describe().details["auto_pause_seconds"] == 600  # the node's supervisor watches idleness
        assert sb.commands.run(["true"]).exit_code == 0
        process = sb.commands.start(["sh", "-c", "echo ready; exec sleep 300"])
        with pytest.raises(errors.StreamIdle):
            for _ in process.output(idle_timeout=1.0):  # the relayed stream ends on silence too
                pass
        process.kill()
        node = _node_of(sim, sb)
    audit = sim.homes[node] / "audit" / f"{sb.id}.jsonl"
    entries = {e["op"]: e for e in map(json.loads, audit.read_text().splitlines())}
    for op in ("sandbox.create", "exec.run", "proc.start", "sandbox.destroy"):
        assert entries[op]["actor"]["on_behalf_of"] == principal, entries[op]


def test_a_restarted_node_agent_finds_the_sandboxes_of_its_node(ray_cluster: SimulatedCluster) -> None:
    sim = ray_cluster
    with sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", node=sim.nodes[1]) as sb:
        sb.files.write("/tmp/kept", "still here")
        agent = sim.mvm.agent(sim.nodes[1])
        ray.kill(agent)  # the agent process dies; the node and supervisors live
        wait_for(lambda: _dead(agent), "the killed agent to be dead (ray.kill does not wait)")
        with pytest.raises(errors.SandboxError) as caught:
            sb.commands.run(["true"])
        assert not isinstance(caught.value, errors.SandboxLost) and "restarted" in caught.value.message
        assert sb.files.read("/tmp/kept") == b"still here"  # the same handle, through the new agent
        assert sb.id in {info.id for info in mvm.Sandbox.list(cluster=Cluster())}


def _dead(actor: object) -> bool:
    try:
        ray.get(actor.ping.remote(), timeout=30)  # type: ignore[attr-defined]
    except ray.exceptions.RayActorError:
        return True
    return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_snapshot_saved_on_one_node_restores_on_another(ray_cluster: SimulatedCluster, backend: str) -> None:
    sim = ray_cluster
    source_node, target_node = sim.nodes[1], sim.nodes[0]
    with sim.mvm.create(TEMPLATE, backend=backend, ttl="10m", node=source_node) as source:
        source.files.write("/root/state.txt", f"saved on {source_node}")
        snap = source.snapshot(keep=True)
    copied = sim.mvm.copy_snapshot(snap.id, source=source_node, target=target_node)
    assert copied["bytes"] > 0
    target_store = sim.homes[target_node] / "snapshots" / snap.id
    assert sorted(p.name for p in target_store.iterdir()) == sorted(
        p.name for p in (sim.homes[source_node] / "snapshots" / snap.id).iterdir()
    )
    assert not any("key" in p.name for p in target_store.rglob("*"))  # sealed bytes only
    restored = sim.mvm.create(TEMPLATE, backend=backend, ttl="10m", node=target_node, from_snapshot=snap.id)
    with restored:
        assert _node_of(sim, restored) == target_node
        assert restored.files.read("/root/state.txt").decode() == f"saved on {source_node}"


def test_a_dead_node_takes_its_sandboxes_and_nothing_hangs(ray_cluster: SimulatedCluster) -> None:
    """Runs last: removes node 2."""
    sim = ray_cluster
    doomed_node = sim.nodes[2]
    doomed = [sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", node=doomed_node) for _ in range(2)]
    survivor = sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m", node=sim.nodes[1])
    running = doomed[0].commands.start(["sleep", "600"])
    try:
        # The machine dies: its raylet and workers, and every process on it (the
        # supervisors of its sandboxes, found by their records under that node's home).
        supervisors = [load_record(sim.homes[doomed_node] / "sandboxes" / sb.id)["supervisor_pid"] for sb in doomed]
        sim.ray_cluster.remove_node(sim.raylets[doomed_node])
        for pid in supervisors:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: doomed_node not in sim.mvm.alive_nodes(), timeout=60, what="node declared dead")
        with pytest.raises(errors.SandboxLost):
            running.wait()
        with pytest.raises(errors.SandboxLost):
            doomed[1].commands.run(["true"])
        states = {info.id: info.state for info in mvm.Sandbox.list(cluster=Cluster())}  # any process's view
        assert states[doomed[0].id] == states[doomed[1].id] == "lost"
        assert states[survivor.id] == "running"
        with pytest.raises(errors.SandboxLost):
            mvm.Sandbox.connect(doomed[0].id, cluster=Cluster())
        assert survivor.commands.run(["true"]).exit_code == 0
        replacement = sim.mvm.create(TEMPLATE, backend="namespace", ttl="10m")
        with replacement:
            assert _node_of(sim, replacement) != doomed_node
        assert not any(pid_alive(pid) for pid in supervisors)
    finally:
        survivor.kill()
        for sb in doomed:
            sim.mvm.forget(sb.id)
        from mvm.supervisor.state import reap

        for directory in (Path(sim.homes[doomed_node]) / "sandboxes").glob("sb-*"):
            reap(directory, load_record(directory))
