"""``sandbox.ports`` (port forwards) and ``sandbox.network`` (the egress policy of a running sandbox).

Both directions travel over the supervisor's channel to the guest agent: a
forward needs no guest network interface (it works with ``mode="deny"``), and
allow-listed egress goes through the host-side proxy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import errors
from ..errors import shown
from .models import PortForward
from .policy import network as make_network

if TYPE_CHECKING:
    from .sandbox import Sandbox


class Ports:
    """Port forwards of a sandbox. Reached as ``sandbox.ports``."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def forward(self, *, guest_port: int, host_port: int = 0, host: str = "127.0.0.1",
                allow_wildcard: bool = False, detach: bool = True) -> PortForward:
        """Listen on ``host:host_port`` on this machine and relay every connection to the
        guest's ``127.0.0.1:guest_port``.

        ``host_port=0`` picks a free port (``fwd.host_port``). Exactly ``host`` is bound: a
        wildcard (``"0.0.0.0"``, ``"::"``, ``""``) raises ``InvalidArgument`` unless
        ``allow_wildcard=True``; a port already taken raises ``PortInUse``. The forward
        lasts until ``fwd.close()`` (or the ``with`` block ends) or the sandbox ends; with
        ``detach=False`` also until this handle's connection closes.

        >>> with sandbox.ports.forward(host_port=8080, guest_port=8000) as fwd:
        ...     urllib.request.urlopen(f"http://127.0.0.1:{fwd.host_port}/")
        """
        args = forward_args(guest_port, host_port, host, allow_wildcard, detach)
        result, _ = self._sandbox._client().call("port.forward", args)
        return self._model(result)

    def list(self) -> list[PortForward]:
        """The sandbox's open forwards (with their connection counts)."""
        result, _ = self._sandbox._client().call("port.list")
        return [self._model(raw) for raw in result.get("forwards", [])]

    def close(self, forward: PortForward | str | int) -> None:
        """Close a forward: a ``PortForward``, its ``id``, or its host port. Its open
        connections are reset."""
        args = close_args(forward)  # bad input is refused before connecting
        self._sandbox._client().call("port.close", args)

    def _model(self, raw: dict[str, Any]) -> PortForward:
        return PortForward.from_wire(raw, sandbox=self._sandbox)


class Network:
    """The network policy of a running sandbox. Reached as ``sandbox.network``."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def policy(self) -> dict[str, Any]:
        """``{"mode", "allow", "allow_wildcards", "forwards", "egress"?}`` as ``describe()`` shows it."""
        return dict(self._sandbox.describe().network)

    def update(self, allow: list[str] | tuple[str, ...] | None = None, *, mode: str | None = None,
               allow_wildcards: bool | None = None) -> dict[str, Any]:
        """Replace the egress allow-list of this running sandbox (new connections follow it).

        ``mode`` defaults to ``"allow"`` for a non-empty list and ``"deny"`` for an empty
        one; switching between them starts or stops the egress proxy (processes started
        afterwards get, or lose, ``HTTP(S)_PROXY``). A sandbox created with
        ``mode="open"`` cannot be changed. Entries are validated like ``mvm.network``.

        >>> sandbox.network.update(allow=["pypi.org:443", "files.pythonhosted.org:443"])
        """
        args = update_args(allow, mode, allow_wildcards)  # bad input is refused before connecting
        result, _ = self._sandbox._client().call("network.update", args)
        return dict(result.get("network") or {})


# ---- request building, shared with ``mvm.AsyncSandbox`` ------------------------------------


def forward_args(guest_port: int, host_port: int, host: str, allow_wildcard: bool, detach: bool) -> dict[str, Any]:
    """``port.forward`` arguments, checked."""
    for name, value, low in (("guest_port", guest_port, 1), ("host_port", host_port, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
            raise errors.InvalidArgument(name, f"{shown(value)} is not a port number", allowed=f"{low}..65535")
    if not isinstance(host, str):
        raise errors.InvalidArgument("host", f"{shown(host)} is not an address", allowed="e.g. '127.0.0.1'")
    return {"host": host, "host_port": host_port, "guest_port": guest_port,
            "allow_wildcard": bool(allow_wildcard), "detach": bool(detach)}


def close_args(forward: PortForward | str | int) -> dict[str, Any]:
    """``port.close`` arguments for a ``PortForward``, its id or its host port."""
    if isinstance(forward, PortForward):
        return {"id": forward.id}
    if isinstance(forward, str):
        return {"id": forward}
    if isinstance(forward, int) and not isinstance(forward, bool):
        return {"host_port": forward}
    raise errors.InvalidArgument("forward", f"{shown(forward)}", allowed="a PortForward, its id or its host port")


def update_args(
    allow: list[str] | tuple[str, ...] | None, mode: str | None, allow_wildcards: bool | None
) -> dict[str, Any]:
    """``network.update`` arguments; entries are validated like ``mvm.network``."""
    if allow is not None and isinstance(allow, str):
        raise errors.InvalidNetworkPolicy("network.allow", "must be a list of 'host:port' strings, not one string")
    entries = list(allow) if allow is not None else None
    if entries is not None:
        resolved = mode or ("allow" if entries else "deny")
        if resolved in ("allow", "deny"):  # the supervisor refuses other modes with its own message
            # allow_wildcards=None keeps the sandbox's own setting, which only the supervisor
            # knows: check the entries' syntax here as if wildcards were allowed, and leave
            # the wildcard decision to it.
            wildcards = True if allow_wildcards is None else allow_wildcards
            make_network(resolved, entries, allow_wildcards=wildcards)
    return {"allow": entries, "mode": mode, "allow_wildcards": allow_wildcards}
