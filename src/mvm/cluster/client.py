"""``mvm.connect_cluster``: the same ``Sandbox`` API over a Ray cluster.

    cluster = mvm.connect_cluster("auto")              # or "ray://head:10001", or an initialised Ray
    with cluster.create("python-3.13", backend="namespace") as sandbox:   # an mvm.Sandbox
        print(sandbox.commands.run(["uname", "-n"]).stdout)
    cluster.list()                                     # every node's sandboxes; a dead node's are "lost"
    mvm.Sandbox.connect(sandbox.id, cluster=cluster)   # from any process of the cluster

Requests go from the caller straight to the node agent of the node that owns the
sandbox (a Ray actor call to that node), which relays them to the sandbox's supervisor
socket there; nothing passes the head node except when the caller itself is a
``ray://`` client (Ray Client proxies every call through the head).
"""

from __future__ import annotations

from functools import partial
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import errors
from ..sdk.models import SandboxInfo
from ..spec import DEFAULT_TEMPLATE, validate_on_behalf_of
from ..supervisor import client_core
from ..templates.catalog import BUILTIN
from . import directory
from .agent import NodeLimits, streaming_options
from .placement import DEFAULT_STRATEGY, NodeReport, SandboxRequest, rank, validate_strategy

NAMESPACE = "mvm"
AGENT_PREFIX = "mvm-node-"
#: How long a node may take to answer a report before placement skips it.
REPORT_TIMEOUT = 15.0
#: Grace added to a request's own timeout before the relay is declared lost.
RELAY_GRACE = 30.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise errors.BackendUnavailable(
            "the cluster path needs Ray: pip install 'mvm[ray]'", backend="ray"
        ) from None
    return ray


def agent_name(node_id: str) -> str:
    return AGENT_PREFIX + node_id


def connect_cluster(
    address: str | None = "auto",
    *,
    strategy: str = DEFAULT_STRATEGY,
    limits: NodeLimits | None = None,
    node_homes: Mapping[str, str] | None = None,
    node_env: Mapping[str, Mapping[str, str]] | None = None,
) -> Cluster:
    """Attach to a Ray cluster (``"auto"``, ``"ray://host:port"``, or ``None`` when this
    process already called ``ray.init``) and make sure every alive node runs its mvm
    node agent. ``node_homes`` (node id -> ``MVM_HOME``) is for simulated nodes sharing
    one machine; real nodes use their own ``~/.mvm``. ``node_env`` (node id -> variables)
    adds environment for a node's agent (e.g. its own ``MVM_TEMPLATES``)."""
    ray = _ray()
    if not ray.is_initialized():
        if address is None:
            raise errors.InvalidArgument("address", "Ray is not initialised", allowed=["auto", "ray://host:port"])
        ray.init(address=address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
    cluster = Cluster(strategy=strategy, limits=limits, node_homes=node_homes, node_env=node_env)
    cluster.ensure_agents()
    return cluster


class Cluster:
    """A handle on the mvm node agents of one Ray cluster. Cheap; any process may make one."""

    def __init__(
        self,
        *,
        strategy: str = DEFAULT_STRATEGY,
        limits: NodeLimits | None = None,
        node_homes: Mapping[str, str] | None = None,
        node_env: Mapping[str, Mapping[str, str]] | None = None,
    ):
        self.strategy = validate_strategy(strategy)
        self.limits = limits
        self.node_env = {node: dict(env) for node, env in (node_env or {}).items()}
        for node, home in (node_homes or {}).items():
            self.node_env.setdefault(node, {})["MVM_HOME"] = home
        self._routes: dict[str, str] = {}  # sandbox id -> node id, learned (a cache)

    # ---- nodes ------------------------------------------------------------------

    def alive_nodes(self) -> list[str]:
        ray = _ray()
        return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]

    def ensure_agents(self) -> dict[str, Any]:
        """Start (or find) the detached node agent on every alive node."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .nodes import NodeAgentActor

        agents = {}
        for node_id in self.alive_nodes():
            options: dict[str, Any] = {
                "name": agent_name(node_id),
                "namespace": NAMESPACE,
                "lifetime": "detached",
                "get_if_exists": True,
                "num_cpus": 0,
                "max_concurrency": 64,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            }
            if self.node_env.get(node_id):
                options["runtime_env"] = {"env_vars": self.node_env[node_id]}
            agents[node_id] = NodeAgentActor.options(**options).remote(node_id, self.limits)
        ray.get([agent.ping.remote() for agent in agents.values()], timeout=120)
        return agents

    def agent(self, node_id: str) -> Any:
        ray = _ray()
        try:
            return ray.get_actor(agent_name(node_id), namespace=NAMESPACE)
        except ValueError:
            raise errors.SandboxLost(f"node {node_id[:12]} has no mvm node agent (node gone?)",
                                     node=node_id) from None

    def reports(self) -> list[NodeReport]:
        """Every alive node's capacity and health; a node that does not answer within
        ``REPORT_TIMEOUT`` is left out (placement never waits on a dying node)."""
        ray = _ray()
        pending = {}
        for node_id in self.alive_nodes():
            try:
                pending[node_id] = self.agent(node_id).report.remote()
            except errors.SandboxLost:
                continue
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=REPORT_TIMEOUT)
        out = []
        for ref in ready:
            try:
                out.append(NodeReport(**ray.get(ref)))
            except ray.exceptions.RayError:
                continue
        return sorted(out, key=lambda r: r.node_id)

    # ---- sandboxes --------------------------------------------------------------

    def create(
        self,
        template: str = DEFAULT_TEMPLATE,
        *,
        placement: str | None = None,
        node: str | None = None,
        include: Sequence[str] | None = None,
        **options: Any,
    ) -> Any:
        """``Sandbox.create`` on a node the placement picks (or on ``node``); returns an
        ``mvm.Sandbox`` whose requests go to that node. Keyword options are
        ``Sandbox.create``'s. ``NoCapacity`` when no node can take it, naming each
        node's reason."""
        from ..sdk.includes import collect_includes
        from ..sdk.sandbox import script_dir

        strategy = validate_strategy(placement or self.strategy)
        if options.setdefault("mode", "live") != "live":
            raise errors.InvalidArgument("mode", "a cluster creates live sandboxes; record and plan run locally",
                                         allowed=["live"])
        # The node's Sandbox.create checks and honours every option (auto_pause too); the
        # principal is also this handle's, sent with each relayed request.
        principal = validate_on_behalf_of(options.get("on_behalf_of"))
        files = collect_includes(include or [], base_dir=script_dir())  # host paths are the caller's
        request = SandboxRequest.of(template, options)
        reports = self.reports()
        holders = [r.node_id for r in reports if template in r.templates]
        if node is not None:
            candidates = [node]
            refused: dict[str, str] = {}
        else:
            ordered, refused = rank(reports, request, strategy)
            candidates = [r.node_id for r in ordered]
        for node_id in candidates:
            if holders and node_id not in holders and template in BUILTIN:
                # copied from a node that has it rather than built again here
                self.copy_template(template, source=holders[0], target=node_id)
            try:
                kind, record, _ = self._get(self.agent(node_id).create.remote(template, options), None)
            except errors.SandboxLost as exc:
                refused[node_id] = exc.message
                continue
            if kind == "error":
                failure = errors.from_wire(record)
                if isinstance(failure, errors.NoCapacity):
                    refused[node_id] = failure.message
                    continue
                raise failure
            sandbox = self._handle(record, on_behalf_of=principal)
            try:
                for guest_path, data, mode_bits in files:
                    sandbox.files.write(guest_path, data, mode=mode_bits)
            except BaseException:
                sandbox.kill()
                raise
            return sandbox
        raise errors.NoCapacity(
            f"no node can take a {template} sandbox: "
            + ("; ".join(f"{n[:12]}: {why}" for n, why in refused.items()) or "no alive node"),
            refused=[f"{n}: {why}" for n, why in refused.items()],
        )

    def connect(self, name_or_id: str) -> Any:
        """The running sandbox ``name_or_id`` on whichever node holds it."""
        record = self._locate(name_or_id)
        if record is None:
            raise errors.SandboxNotFound(f"no sandbox named {name_or_id!r} on any alive node", name=name_or_id)
        if record.get("state") == "lost":  # its node is alive, its supervisor died
            raise errors.SandboxLost(f"sandbox {name_or_id} is lost: its supervisor on node "
                                     f"{str(record.get('node_id'))[:12]} died; `mvmctl gc` there removes it",
                                     sandbox=name_or_id, node=record.get("node_id"))
        return self._handle(record)

    def list(self) -> list[SandboxInfo]:
        """Every node's sandboxes (``details["node_id"]``); one this handle saw on a node
        that has since died is listed with state ``lost``."""
        ray = _ray()
        alive = self.alive_nodes()
        refs = {}
        for node_id in alive:
            try:
                refs[node_id] = self.agent(node_id).sandboxes.remote()
            except errors.SandboxLost:
                continue
        seen: dict[str, dict[str, Any]] = {}
        answered: set[str] = set()
        for node_id, ref in refs.items():
            try:
                records = ray.get(ref, timeout=REPORT_TIMEOUT)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            answered.add(node_id)
            for record in records:
                seen[record["id"]] = record
        infos = [_info(record, record.get("state", "creating")) for record in seen.values()]
        for entry in directory.entries():
            if entry["id"] in seen:
                continue
            if entry["node_id"] in answered:  # its node is fine: destroyed or expired there
                directory.forget(entry["id"])
            elif entry["node_id"] not in alive:
                infos.append(_info(entry, "lost"))
        self._routes.update({i: r["node_id"] for i, r in seen.items()})
        return sorted(infos, key=lambda i: (i.created_at, i.id))

    def forget(self, sandbox_id: str) -> None:
        """Drop a ``lost`` sandbox from the cluster's directory."""
        directory.forget(sandbox_id)

    # ---- templates and snapshots ------------------------------------------------

    def copy_template(self, name: str, *, source: str, target: str) -> dict[str, Any]:
        """Copy the built catalog template ``name`` from node ``source`` to ``target``
        (agent to agent, as a tar stream); ``target`` checks it is its own build key."""
        kind, result, _ = self._get(self.agent(target).import_template.remote(name, self.agent(source)), None)
        if kind == "error":
            raise errors.from_wire(result)
        return dict(result)

    def copy_snapshot(self, snapshot_id: str, *, source: str, target: str) -> dict[str, Any]:
        """Copy a sealed snapshot from node ``source`` to node ``target`` (node to node).
        Only sealed blobs and the signed manifest travel; the target needs the same
        snapshot key and signing key in its keystore (docs/scale-out.md)."""
        kind, result, _ = self._get(self.agent(target).import_snapshot.remote(snapshot_id, self.agent(source)), None)
        if kind == "error":
            raise errors.from_wire(result)
        return dict(result)

    def restore(self, snapshot_id: str, *, source: str, node: str | None = None, **options: Any) -> Any:
        """A sandbox from ``snapshot_id`` (saved on node ``source``) on ``node`` (default:
        the placement's pick other than ``source``... or ``source`` if it is the only one)."""
        if node is None:
            template = str(options.get("template", DEFAULT_TEMPLATE))
            ordered, _ = rank(self.reports(), SandboxRequest.of(template, options), self.strategy)
            others = [r.node_id for r in ordered if r.node_id != source]
            node = others[0] if others else source
        if node != source:
            self.copy_snapshot(snapshot_id, source=source, target=node)
        template = options.pop("template", DEFAULT_TEMPLATE)
        return self.create(template, node=node, from_snapshot=snapshot_id, **options)

    # ---- internals --------------------------------------------------------------

    def _locate(self, name_or_id: str) -> dict[str, Any] | None:
        ray = _ray()
        entry = None if name_or_id in self._routes else directory.lookup(name_or_id)
        node_id = self._routes.get(name_or_id) or (entry["node_id"] if entry else None)
        if entry and node_id and node_id not in self.alive_nodes():
            raise errors.SandboxLost(f"sandbox {name_or_id} is lost: its node {node_id[:12]} is gone",
                                     sandbox=name_or_id, node=node_id)
        nodes = [node_id] if node_id else self.alive_nodes()
        refs = []
        for node in nodes:
            try:
                refs.append(self.agent(node).locate.remote(name_or_id))
            except errors.SandboxLost:
                continue
        for ref in refs:
            try:
                record = ray.get(ref, timeout=REPORT_TIMEOUT)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            if record is not None:
                return dict(record)
        if node_id:  # stale route: look everywhere
            self._routes.pop(name_or_id, None)
            if entry:
                directory.forget(name_or_id)
            return self._locate(name_or_id)
        return None

    def _handle(self, record: dict[str, Any], *, on_behalf_of: dict[str, str] | None = None) -> Any:
        from ..sdk.sandbox import Sandbox

        node_id = record["node_id"]
        self._routes[record["id"]] = node_id
        sandbox_id = record["id"]
        return Sandbox(
            sandbox_id,
            record["name"],
            Path(record.get("directory", "")),
            connect=lambda: ClusterTransport(self, node_id, sandbox_id, on_behalf_of=on_behalf_of),
        )

    def _get(self, ref: Any, timeout: float | None) -> Any:
        """``ray.get`` where a dead node or actor becomes ``SandboxLost`` (never a hang:
        Ray fails pending calls to a dead actor)."""
        ray = _ray()
        try:
            return ray.get(ref, timeout=timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.NodeDiedError, ray.exceptions.OwnerDiedError) as exc:
            raise errors.SandboxLost(f"the node agent went away: {type(exc).__name__}") from None
        except ray.exceptions.GetTimeoutError:
            raise errors.SandboxError(f"no answer from the node agent within {timeout} s") from None


class ClusterTransport:
    """``SupervisorClient``'s shape over the owning node's agent: what a cluster
    ``Sandbox`` speaks through. ``on_behalf_of`` travels with each request: the agent
    relays it over a supervisor connection whose hello names that principal."""

    def __init__(self, cluster: Cluster, node_id: str, sandbox_id: str, *,
                 on_behalf_of: dict[str, str] | None = None):
        self._cluster = cluster
        self.node_id = node_id
        self.sandbox_id = sandbox_id
        self.on_behalf_of = on_behalf_of
        self._agent = cluster.agent(node_id)
        self._closed = False

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        on_data: Callable[[str, bytes], None] | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        self._check_open()
        wait = None if timeout is None else timeout + RELAY_GRACE
        if on_data is None:
            reply = self._lost_guard(lambda: self._cluster._get(
                self._agent.call.remote(self.sandbox_id, op, args, payload, timeout, self.on_behalf_of), wait))
            return _unwrap(reply)
        generator = self._agent.call_streaming.options(**streaming_options()).remote(
            self.sandbox_id, op, args, payload, timeout, self.on_behalf_of
        )
        for item in self._items(generator):
            if item[0] == "data":  # a batch of frames (cluster.agent._Relay)
                for stream, data in item[1]:
                    on_data(stream, data)
                continue
            return _unwrap(item)
        raise errors.SandboxLost(f"{op}: the relay ended without an answer")

    def call_many(self, requests: Sequence[client_core.Request]) -> list[tuple[dict[str, Any], bytes]]:
        """The whole window in one actor call: the node relays it with its own
        ``call_many``, so a window costs one cluster round trip, not one per request."""
        self._check_open()
        window = [(op, args, bytes(payload)) for op, args, payload in requests]  # Ray pickles no memoryview
        replies = self._lost_guard(lambda: self._cluster._get(
            self._agent.call_many.remote(self.sandbox_id, window, self.on_behalf_of), None))
        return [_unwrap(reply) for reply in replies]

    def stream(self, op: str, args: dict[str, Any] | None = None, *,
               idle_timeout: float | None = None) -> Iterator[tuple[str, bytes]]:
        """The node's supervisor client applies ``idle_timeout`` (its ``StreamIdle`` comes
        back as the relay's answer), so a silent stream also ends where it is read."""
        self._check_open()
        token = self._lost_guard(lambda: self._cluster._get(self._agent.open_stream.remote(), REPORT_TIMEOUT))
        generator = self._agent.stream.options(**streaming_options()).remote(
            token, self.sandbox_id, op, args, idle_timeout, self.on_behalf_of)
        finished = False
        try:
            for item in self._items(generator):
                if item[0] == "data":  # a batch of frames (cluster.agent._Relay)
                    yield from item[1]
                    continue
                finished = True
                _unwrap(item)
                return
        finally:
            if not finished:
                self._agent.cancel_stream.remote(token)

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise client_core.handle_closed()

    def _items(self, generator: Any) -> Iterator[Any]:
        for ref in generator:
            yield self._lost_guard(partial(self._cluster._get, ref, None))

    def _lost_guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except errors.SandboxLost:
            if self.node_id in self._cluster.alive_nodes():
                # Only the agent died (the node and its supervisors live): the request's
                # fate is unknown, so it is not retried; the next one uses a new agent.
                self._cluster.ensure_agents()
                self._agent = self._cluster.agent(self.node_id)
                raise errors.SandboxError(
                    f"the node agent of {self.node_id[:12]} restarted during the request; the sandbox is still there",
                    sandbox=self.sandbox_id, node=self.node_id,
                ) from None
            raise errors.SandboxLost(
                f"sandbox {self.sandbox_id} is lost: its node {self.node_id[:12]} is gone",
                sandbox=self.sandbox_id, node=self.node_id,
            ) from None


def _unwrap(reply: Any) -> tuple[dict[str, Any], bytes]:
    kind, result, payload = reply
    if kind == "error":
        raise errors.from_wire(result)
    return dict(result), bytes(payload or b"")


def _info(record: dict[str, Any], state: str) -> SandboxInfo:
    return SandboxInfo.from_record(record, state=state, details={"node_id": record["node_id"]})
