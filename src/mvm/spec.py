"""What a sandbox is asked to be: the one typed definition shared by every layer.

``Resources`` (the limits a backend enforces), ``NetworkPolicy`` (``deny`` /
``allow`` / ``open``) and ``SandboxConfig`` (what ``config.json`` holds) live here
with their validation, so the SDK builders (``mvm.resources``, ``mvm.network``),
the CLI, the supervisor (the trust boundary: raw clients and the TypeScript SDK
talk to it too), record/plan mode and the IR all check one thing one way.

This module is neutral: it imports neither ``mvm.sdk`` nor ``mvm.supervisor`` nor a
backend. ``from_json`` validates, so JSON from disk, the IR or the CLI becomes a
typed value or an :class:`~mvm.errors.InvalidArgument` /
:class:`~mvm.errors.InvalidNetworkPolicy` naming the field and the allowed values.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import errors
from .errors import kind_of, shown
from .durations import parse_duration

#: Bounds a sandbox may ask for (the host policy of ``mvmctl run --mode plan`` may be tighter).
LIMITS: dict[str, tuple[float, int]] = {
    "cpu_cores": (0.1, 64),
    "memory_mb": (64, 262144),
    "rootfs_size_mb": (64, 1048576),
    "max_processes": (8, 65536),
}
NETWORK_MODES = ("deny", "allow", "open")
#: What a create asks for when it names no template / no TTL (SDK, ``mvmctl up``, pools, MCP, cluster).
DEFAULT_TEMPLATE = "python-3.13"
DEFAULT_TTL = "30m"
#: Sandbox names: what ``mvmctl`` accepts as NAME and what a directory entry may be.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
#: The name a guest uses for the host's own loopback (127.0.0.1) in mode ``allow``: routed
#: through the egress proxy, and only to ports whose ``host.mvm.internal:PORT`` entry is listed.
#: (The guest's 127.0.0.1 is its own loopback.)
HOST_ALIAS = "host.mvm.internal"
HOST_ALIAS_ADDRESS = "127.0.0.1"
_HOST_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")


@dataclass(frozen=True)
class Resources:
    """Limits every backend enforces (not just records). Build with ``mvm.resources(...)``
    or :meth:`from_json`; both validate against :data:`LIMITS`."""

    cpu_cores: float = 1
    memory_mb: int = 512
    rootfs_size_mb: int = 1024
    max_processes: int = 256

    @classmethod
    def validated(  # the defaults are the fields' own (class scope): one definition of each
        cls, cpu_cores: Any = cpu_cores, memory_mb: Any = memory_mb, rootfs_size_mb: Any = rootfs_size_mb,
        max_processes: Any = max_processes,
    ) -> Resources:
        values = {
            "cpu_cores": cpu_cores,
            "memory_mb": memory_mb,
            "rootfs_size_mb": rootfs_size_mb,
            "max_processes": max_processes,
        }
        for name, value in values.items():
            low, high = LIMITS[name]
            bounds = f"{low}..{high}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise errors.InvalidArgument(f"resources.{name}", f"{shown(value)} is not a number", allowed=bounds)
            if name != "cpu_cores" and not float(value).is_integer():
                raise errors.InvalidArgument(f"resources.{name}", f"{shown(value)} must be a whole number",
                                             allowed=bounds)
            if not low <= value <= high:
                raise errors.InvalidArgument(f"resources.{name}", f"{value} is out of range", allowed=bounds)
        return cls(
            cpu_cores=float(cpu_cores),
            memory_mb=int(memory_mb),
            rootfs_size_mb=int(rootfs_size_mb),
            max_processes=int(max_processes),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu_cores": self.cpu_cores,
            "memory_mb": self.memory_mb,
            "rootfs_size_mb": self.rootfs_size_mb,
            "max_processes": self.max_processes,
        }

    @classmethod
    def from_json(cls, data: Any) -> Resources:
        """Validated; missing fields take the defaults, unknown ones are refused."""
        if not isinstance(data, Mapping):
            raise errors.InvalidArgument("resources", f"{kind_of(data)} is not an object",
                                         allowed=sorted(LIMITS))
        unknown = sorted(set(data) - set(LIMITS))
        if unknown:
            raise errors.InvalidArgument(f"resources.{unknown[0]}", "unknown field", allowed=sorted(LIMITS))
        return cls.validated(**data)


@dataclass(frozen=True)
class NetworkPolicy:
    """``deny`` (no interface but loopback), ``allow`` (egress via the host proxy, only to
    the ``host:port`` entries of ``allow``), ``open`` (full outbound access)."""

    mode: Literal["deny", "allow", "open"] = "deny"
    allow: tuple[str, ...] = ()
    allow_wildcards: bool = False

    @classmethod
    def validated(  # the defaults are the fields' own (class scope), as in Resources.validated
        cls, mode: Any = mode, allow: Any = allow, *, allow_wildcards: Any = allow_wildcards,
    ) -> NetworkPolicy:
        if mode not in NETWORK_MODES:
            raise errors.InvalidNetworkPolicy("network.mode", f"unknown mode {shown(mode)}",
                                              allowed=list(NETWORK_MODES))
        if isinstance(allow, str):
            raise errors.InvalidNetworkPolicy("network.allow", "must be a list of 'host:port' strings, not one string")
        try:
            entries = tuple(allow)
        except TypeError:
            raise errors.InvalidNetworkPolicy("network.allow", "must be a list of 'host:port' strings") from None
        if not isinstance(allow_wildcards, bool):
            raise errors.InvalidNetworkPolicy("network.allow_wildcards", f"{shown(allow_wildcards)} is not a boolean",
                                              allowed=[True, False])
        if mode != "allow" and entries:
            raise errors.InvalidNetworkPolicy("network.allow",
                                              f"an allow-list needs mode='allow' (mode is {shown(mode)})")
        if mode == "allow" and not entries:
            raise errors.InvalidNetworkPolicy("network.allow", "mode='allow' needs at least one 'host:port' entry")
        for entry in entries:
            validate_destination(entry, allow_wildcards)
        return cls(mode=mode, allow=entries, allow_wildcards=allow_wildcards)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "allow": list(self.allow), "allow_wildcards": self.allow_wildcards}

    @classmethod
    def from_json(cls, data: Any) -> NetworkPolicy:
        """Validated (the same checks as ``mvm.network``)."""
        if not isinstance(data, Mapping):
            raise errors.InvalidNetworkPolicy("network", f"{kind_of(data)} is not an object",
                                              allowed=["mode", "allow", "allow_wildcards"])
        unknown = sorted(set(data) - {"mode", "allow", "allow_wildcards"})
        if unknown:
            raise errors.InvalidNetworkPolicy(f"network.{unknown[0]}", "unknown field",
                                              allowed=["mode", "allow", "allow_wildcards"])
        return cls.validated(data.get("mode", "deny"), data.get("allow") or (),
                             allow_wildcards=data.get("allow_wildcards", False))


def validate_destination(entry: Any, allow_wildcards: bool) -> None:
    """One ``host:port`` entry of an allow-list (a host name, an address, or -- with
    ``allow_wildcards`` -- ``*.domain`` or a CIDR block)."""
    name = f"network.allow[{shown(entry)}]"
    if not isinstance(entry, str) or ":" not in entry:
        raise errors.InvalidNetworkPolicy(name, "must be 'host:port'", allowed="e.g. 'pypi.org:443'")
    host, _, port_text = entry.rpartition(":")
    host = host.strip("[]")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise errors.InvalidNetworkPolicy(name, f"port {shown(port_text)} is not valid", allowed="1..65535")
    if is_loopback(host):
        raise errors.InvalidNetworkPolicy(
            name, f"{host} is the sandbox's own loopback, not the host's; to reach a service on the host's "
            f"127.0.0.1 allow '{HOST_ALIAS}:{port_text}' and connect to {HOST_ALIAS}:{port_text} (through the "
            "egress proxy the guest's HTTP_PROXY points at)", allowed=f"'{HOST_ALIAS}:{port_text}'")
    wildcard = "*" in host or host in ("0.0.0.0", "::") or "/" in host
    if wildcard and not allow_wildcards:
        raise errors.InvalidNetworkPolicy(name, "wildcards are refused unless allow_wildcards is true")
    if "/" in host:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise errors.InvalidNetworkPolicy(name, f"{shown(host)} is not a valid network") from None
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOST_RE.fullmatch(host):
        raise errors.InvalidNetworkPolicy(name, f"{shown(host)} is not a valid host name")


def is_loopback(host: str) -> bool:
    """``localhost``, a loopback address or a block inside the loopback range: in the guest
    these are the guest itself (and ``NO_PROXY`` keeps clients off the proxy for them)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        if "/" in host:
            net = ipaddress.ip_network(host, strict=False)
            return net.prefixlen > 0 and net.network_address.is_loopback and net.broadcast_address.is_loopback
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def create_defaults() -> dict[str, Any]:
    """What a create asks for where it names nothing, in wire form: ``mvmctl defaults --json``
    prints it, and ``mvmctl run`` / ``compile`` hand it to a Node script as
    ``$MVM_CREATE_DEFAULTS``, so the TypeScript SDK applies these values, not copies of them."""
    return {
        "template": DEFAULT_TEMPLATE,
        "ttl_seconds": parse_duration(DEFAULT_TTL, field="ttl"),
        "resources": Resources().to_json(),
        "network": NetworkPolicy().to_json(),
    }


def validate_name(name: Any) -> str:
    """A sandbox name: lowercase letters, digits, ``-_.``; 1-63 characters."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise errors.InvalidArgument(
            "name",
            f"{shown(name)} is not a valid sandbox name",
            allowed="lowercase letters, digits, '-', '_', '.'; 1-63 chars",
        )
    return name


def default_name(workload_id: str | None, sandbox_id: str) -> str:
    """The name of a sandbox created without one: derived from its workload id, else its id."""
    if workload_id:
        base = "".join(c if c.isalnum() or c in "-_." else "-" for c in workload_id.lower()).strip("-_.")[:40]
        if base:
            return f"{base}-{sandbox_id[3:9]}"
    return sandbox_id


def validate_env_names(env: Mapping[Any, Any], name: str = "env") -> None:
    """Keys of an environment mapping: non-empty strings without ``=`` or NUL."""
    for key in env:
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise errors.InvalidArgument(name, f"{shown(key)} is not a valid variable name")


def validate_tags(tags: Any) -> dict[str, str]:
    if not isinstance(tags, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise errors.InvalidArgument("tags", "keys and values must be strings")
    return dict(tags)


def validate_on_behalf_of(principal: Any) -> dict[str, str] | None:
    """Who a host client acts for (an MCP server names its MCP client): audited with
    each request as a claim next to the client's own credentials."""
    if principal is None:
        return None
    if (not isinstance(principal, Mapping) or not principal
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in principal.items())):
        raise errors.InvalidArgument("on_behalf_of", f"{shown(principal)}", allowed="a non-empty dict of str to str")
    return dict(principal)


def validate_workload_id(workload_id: Any) -> str | None:
    if workload_id is not None and (not isinstance(workload_id, str) or not workload_id.strip()):
        raise errors.InvalidArgument("workload_id", f"{shown(workload_id)} must be a non-empty string")
    return workload_id


def validate_snapshot_ref(snapshot: Any, name: str = "from_snapshot") -> str | None:
    if snapshot is not None and (not isinstance(snapshot, str) or not snapshot.strip()):
        raise errors.InvalidArgument(name, f"{shown(snapshot)} must be a snapshot id or name")
    return snapshot


POOL_ID_RE = re.compile(r"^pl-[0-9a-f]{10}$")


def validate_pool_id(pool_id: Any, name: str = "pool") -> str | None:
    """A warm pool's id (``pl-`` and 10 hex digits), or None."""
    if pool_id is not None and (not isinstance(pool_id, str) or not POOL_ID_RE.match(pool_id)):
        raise errors.InvalidArgument(name, f"{shown(pool_id)} is not a pool id", allowed="pl- and 10 hex digits")
    return pool_id


def _str_map(data: Any, name: str) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, Mapping) or not all(isinstance(v, str) for v in data.values()):
        raise errors.InvalidArgument(name, "must map names to strings")
    validate_env_names(data, name)
    return dict(data)


@dataclass(frozen=True)
class SandboxConfig:
    """What a sandbox's ``config.json`` holds: everything its supervisor needs to make it.

    Secret values are never part of it: ``secret_env_names`` maps an env key to the
    secret's *name*; the value travels over the supervisor's stdin only.
    """

    id: str
    name: str
    template: str
    backend: str
    resources: Resources = field(default_factory=Resources)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    ttl_seconds: int | None = None
    #: Pause after this many idle seconds, resume on the next request (supervisor/idle.py).
    auto_pause_seconds: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env_names: Mapping[str, str] = field(default_factory=dict)
    workload_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    from_snapshot: str | None = None
    run_id: str | None = None
    on_behalf_of: Mapping[str, str] | None = None
    #: Pre-started as a member of this warm pool (mvm/pooling): it waits, unclaimed, in
    #: state ``pooled`` until a create claims it (or its ``ttl_seconds`` run out).
    pool: str | None = None
    #: The built template directory ``launch`` resolved ``template`` to: the supervisor
    #: loads that build rather than resolving (hashing the agent, listing templates) again.
    template_dir: str | None = None
    #: The isolation ``backend`` gives (``vm`` / ``namespace``), as the backend registry
    #: answered when ``launch`` chose it: listings (Python's and TypeScript's) read it here.
    isolation: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "template": self.template,
            "backend": self.backend,
            "resources": self.resources.to_json(),
            "network": self.network.to_json(),
            "ttl_seconds": self.ttl_seconds,
            "auto_pause_seconds": self.auto_pause_seconds,
            "env": dict(self.env),
            "secret_env_names": dict(self.secret_env_names),
            "workload_id": self.workload_id,
            "tags": dict(self.tags),
            "created_at": self.created_at,
            "from_snapshot": self.from_snapshot,
            "run_id": self.run_id,
            "on_behalf_of": dict(self.on_behalf_of) if self.on_behalf_of is not None else None,
            "pool": self.pool,
            "template_dir": self.template_dir,
            "isolation": self.isolation,
        }

    @classmethod
    def from_json(cls, data: Any) -> SandboxConfig:
        """Validated: a typed config, or an error naming the first bad field."""
        if not isinstance(data, Mapping):
            raise errors.InvalidArgument("config", f"{kind_of(data)} is not an object")
        for key in ("id", "template", "backend"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise errors.InvalidArgument(key, f"{shown(data.get(key))} must be a non-empty string")
        ttl = data.get("ttl_seconds")
        auto_pause = data.get("auto_pause_seconds")
        created_at = data.get("created_at") or 0.0
        if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
            raise errors.InvalidArgument("created_at", f"{shown(created_at)} is not a timestamp")
        run_id = data.get("run_id")
        if run_id is not None and not isinstance(run_id, str):
            raise errors.InvalidArgument("run_id", f"{shown(run_id)} must be a string")
        template_dir = data.get("template_dir")
        if template_dir is not None and (not isinstance(template_dir, str) or not template_dir.startswith("/")):
            raise errors.InvalidArgument("template_dir", f"{shown(template_dir)} must be an absolute path")
        isolation = data.get("isolation")
        if isolation is not None and (not isinstance(isolation, str) or not isolation):
            raise errors.InvalidArgument("isolation", f"{shown(isolation)} must be a non-empty string")
        return cls(
            id=data["id"],
            name=validate_name(data.get("name")),
            template=data["template"],
            backend=data["backend"],
            resources=Resources.from_json(data.get("resources") or {}),
            network=NetworkPolicy.from_json(data.get("network") or {}),
            ttl_seconds=None if ttl is None else parse_duration(ttl, field="ttl"),
            auto_pause_seconds=None if auto_pause is None else parse_duration(auto_pause, field="auto_pause"),
            env=_str_map(data.get("env"), "env"),
            secret_env_names=_str_map(data.get("secret_env_names"), "secret_env_names"),
            workload_id=validate_workload_id(data.get("workload_id")),
            tags=validate_tags(data.get("tags") or {}),
            created_at=float(created_at),
            from_snapshot=validate_snapshot_ref(data.get("from_snapshot")),
            run_id=run_id,
            on_behalf_of=validate_on_behalf_of(data.get("on_behalf_of")),
            pool=validate_pool_id(data.get("pool")),
            template_dir=template_dir,
            isolation=isolation,
        )
