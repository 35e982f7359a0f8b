"""The policy builders of the seed's example: ``mvm.resources``, ``mvm.network``, ``mvm.secret``.

They validate at the call, so a typo fails where it was written, naming the
field and the allowed values. The checks themselves live in :mod:`mvm.spec`
(shared with the CLI, the supervisor and record/plan mode).
"""

from __future__ import annotations

from ..security.secrets import SecretRef
from ..spec import LIMITS as LIMITS
from ..spec import NETWORK_MODES as NETWORK_MODES
from ..spec import NetworkPolicy, Resources


def resources(
    cpu_cores: float = Resources.cpu_cores,
    memory_mb: int = Resources.memory_mb,
    rootfs_size_mb: int = Resources.rootfs_size_mb,
    max_processes: int = Resources.max_processes,
) -> Resources:
    """Limits the backend enforces: CPU, memory, writable disk, process count.

    >>> mvm.resources(cpu_cores=1, memory_mb=512, rootfs_size_mb=1024)
    """
    return Resources.validated(cpu_cores, memory_mb, rootfs_size_mb, max_processes)


def network(
    mode: str = NetworkPolicy.mode, allow: list[str] | tuple[str, ...] = NetworkPolicy.allow, *,
    allow_wildcards: bool = NetworkPolicy.allow_wildcards,
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
    return NetworkPolicy.validated(mode, allow, allow_wildcards=allow_wildcards)


def secret(name: str) -> SecretRef:
    """A reference to a secret, resolved only in live mode, only into the env of the
    process that asked; recordings, plans, logs and audit entries hold the name only.

    >>> env={"API_KEY": mvm.secret("api-key")}
    """
    return SecretRef(name)
