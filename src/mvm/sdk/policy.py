"""The policy builders of the seed's example: ``mvm.resources``, ``mvm.network``, ``mvm.secret``.

They validate at the call, so a typo fails where it was written, naming the
field and the allowed values.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from .. import errors
from ..backends.base import HOST_ALIAS, NetworkPolicy, Resources
from ..security.secrets import SecretRef

#: Bounds a sandbox may ask for (the host policy of ``mvmctl run --mode plan`` may be tighter).
LIMITS = {
    "cpu_cores": (0.1, 64),
    "memory_mb": (64, 262144),
    "rootfs_size_mb": (64, 1048576),
    "max_processes": (8, 65536),
}
NETWORK_MODES = ("deny", "allow", "open")
_HOST_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")


def resources(
    cpu_cores: float = 1,
    memory_mb: int = 512,
    rootfs_size_mb: int = 1024,
    max_processes: int = 256,
) -> Resources:
    """Limits the backend enforces: CPU, memory, writable disk, process count.

    >>> mvm.resources(cpu_cores=1, memory_mb=512, rootfs_size_mb=1024)
    """
    values = {
        "cpu_cores": cpu_cores,
        "memory_mb": memory_mb,
        "rootfs_size_mb": rootfs_size_mb,
        "max_processes": max_processes,
    }
    for field, value in values.items():
        low, high = LIMITS[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise errors.InvalidArgument(f"resources.{field}", f"{value!r} is not a number", allowed=f"{low}..{high}")
        if field != "cpu_cores" and not float(value).is_integer():
            raise errors.InvalidArgument(
                f"resources.{field}", f"{value!r} must be a whole number", allowed=f"{low}..{high}"
            )
        if not low <= value <= high:
            raise errors.InvalidArgument(f"resources.{field}", f"{value} is out of range", allowed=f"{low}..{high}")
    return Resources(
        cpu_cores=float(cpu_cores),
        memory_mb=int(memory_mb),
        rootfs_size_mb=int(rootfs_size_mb),
        max_processes=int(max_processes),
    )


def network(
    mode: str = "deny", allow: list[str] | tuple[str, ...] = (), *, allow_wildcards: bool = False
) -> NetworkPolicy:
    """The sandbox's network: ``deny`` (default: no interface at all but loopback),
    ``allow`` (egress only to ``host:port`` entries, through mvm's egress proxy), or
    ``open`` (full outbound access: an explicit opt-in).

    The host's own loopback services (a local model server, a database) are
    ``host.mvm.internal:PORT`` -- listed explicitly; ``127.0.0.1``/``localhost``
    entries are refused, since in the guest they are the guest itself.

    >>> mvm.network(mode="allow", allow=["pypi.org:443", "files.pythonhosted.org:443"])
    >>> mvm.network(mode="allow", allow=["host.mvm.internal:11434"])  # http://host.mvm.internal:11434
    """
    if mode not in NETWORK_MODES:
        raise errors.InvalidNetworkPolicy("network.mode", f"unknown mode {mode!r}", allowed=list(NETWORK_MODES))
    if isinstance(allow, str):
        raise errors.InvalidNetworkPolicy("network.allow", "must be a list of 'host:port' strings, not one string")
    entries = tuple(allow)
    if mode != "allow" and entries:
        raise errors.InvalidNetworkPolicy("network.allow", f"an allow-list needs mode='allow' (mode is {mode!r})")
    if mode == "allow" and not entries:
        raise errors.InvalidNetworkPolicy("network.allow", "mode='allow' needs at least one 'host:port' entry")
    for entry in entries:
        _validate_destination(entry, allow_wildcards)
    return NetworkPolicy(mode=mode, allow=entries, allow_wildcards=allow_wildcards)  # type: ignore[arg-type]


def _validate_destination(entry: Any, allow_wildcards: bool) -> None:
    field = f"network.allow[{entry!r}]"
    if not isinstance(entry, str) or ":" not in entry:
        raise errors.InvalidNetworkPolicy(field, "must be 'host:port'", allowed="e.g. 'pypi.org:443'")
    host, _, port_text = entry.rpartition(":")
    host = host.strip("[]")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise errors.InvalidNetworkPolicy(field, f"port {port_text!r} is not valid", allowed="1..65535")
    if _is_loopback(host):
        raise errors.InvalidNetworkPolicy(
            field, f"{host} is the sandbox's own loopback, not the host's; to reach a service on the host's "
            f"127.0.0.1 allow '{HOST_ALIAS}:{port_text}' and connect to {HOST_ALIAS}:{port_text} (through the "
            "egress proxy the guest's HTTP_PROXY points at)", allowed=f"'{HOST_ALIAS}:{port_text}'")
    wildcard = "*" in host or host in ("0.0.0.0", "::") or "/" in host
    if wildcard and not allow_wildcards:
        raise errors.InvalidNetworkPolicy(field, "wildcards are refused unless allow_wildcards=True")
    if "/" in host:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise errors.InvalidNetworkPolicy(field, f"{host!r} is not a valid network") from None
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOST_RE.fullmatch(host):
        raise errors.InvalidNetworkPolicy(field, f"{host!r} is not a valid host name")


def _is_loopback(host: str) -> bool:
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


def secret(name: str) -> SecretRef:
    """A reference to a secret, resolved only in live mode, only into the env of the
    process that asked; recordings, plans, logs and audit entries hold the name only.

    >>> env={"API_KEY": mvm.secret("api-key")}
    """
    return SecretRef(name)
