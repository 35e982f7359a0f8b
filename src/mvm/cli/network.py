"""``mvmctl port forward | ls | close`` and ``mvmctl network show | update``."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING

import click

from .. import errors
from .common import connect, emit, json_option

if TYPE_CHECKING:
    from ..sdk.models import PortForward


def register(cli: click.Group) -> None:
    cli.add_command(port)
    cli.add_command(network)


def parse_spec(spec: str) -> tuple[str, int, int]:
    """``[HOST:]HOST_PORT:GUEST_PORT`` (``[::1]:8080:8000`` for IPv6) -> (host, host_port, guest_port)."""
    host = "127.0.0.1"
    rest = spec
    if spec.startswith("["):
        end = spec.find("]:")
        if end < 0:
            raise errors.InvalidArgument("SPEC", f"{spec!r}: an IPv6 host needs [ADDRESS]:HOST_PORT:GUEST_PORT")
        host, rest = spec[1:end], spec[end + 2 :]
    parts = rest.split(":")
    if not spec.startswith("[") and len(parts) == 3:
        host, parts = parts[0], parts[1:]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise errors.InvalidArgument("SPEC", f"{spec!r} is not [HOST:]HOST_PORT:GUEST_PORT",
                                     allowed="e.g. 127.0.0.1:8080:8000 or 8080:8000 (HOST_PORT 0 picks one)")
    return host, int(parts[0]), int(parts[1])


def _forward_line(f: PortForward) -> str:
    return f"{f.address} -> guest 127.0.0.1:{f.guest_port}"


@click.group()
def port() -> None:
    """Forward host ports to ports inside a sandbox (over the agent channel: no guest network needed)."""


@port.command("forward")
@click.argument("name")
@click.argument("spec")
@click.option("--detach", "-d", is_flag=True, help="Keep the forward in the sandbox's supervisor and return.")
@click.option("--allow-wildcard", is_flag=True, help="Allow HOST 0.0.0.0 / :: (every interface of this machine).")
@json_option
def forward(name: str, spec: str, detach: bool, allow_wildcard: bool, as_json: bool) -> None:
    """Relay [HOST:]HOST_PORT (default host 127.0.0.1) to GUEST_PORT in sandbox NAME.

    Stays in the foreground until Ctrl-C (the forward ends with this command) unless
    --detach: then it lasts until `mvmctl port close` or the end of the sandbox.
    """
    host, host_port, guest_port = parse_spec(spec)
    sandbox = connect(name)
    fwd = sandbox.ports.forward(host=host, host_port=host_port, guest_port=guest_port,
                                allow_wildcard=allow_wildcard, detach=detach)
    if detach:
        emit(as_json, fwd.to_dict(), f"forwarding {_forward_line(fwd)} ({fwd.id}); "
                                     f"`mvmctl port close {name} {fwd.host_port}` ends it")
        return
    emit(as_json, fwd.to_dict(), f"forwarding {_forward_line(fwd)}; Ctrl-C to stop")
    sys.stdout.flush()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    # The forward is bound to this connection: it ends when we close it (or die).
    while not stop.wait(1.0):
        try:
            if not any(f.id == fwd.id for f in sandbox.ports.list()):
                click.echo("the forward was closed", err=True)
                sys.exit(1)
        except (errors.SandboxError, errors.SandboxNotFound, errors.InvalidState):
            click.echo("the sandbox is gone", err=True)
            sys.exit(1)
    fwd.close()
    sandbox.close()
    if not as_json:
        click.echo("forward closed")


@port.command("ls")
@click.argument("name")
@json_option
def ls(name: str, as_json: bool) -> None:
    """List the sandbox's port forwards."""
    forwards = connect(name).ports.list()

    def human() -> None:
        click.echo(f"{'HOST':<28} {'GUEST':>6} {'OPEN':>5} {'TOTAL':>6} {'MODE':<9} ID")
        for f in forwards:
            click.echo(f"{f.address:<28} {f.guest_port:>6} {f.connections:>5} {f.total_connections:>6} "
                       f"{'detached' if f.detached else 'attached':<9} {f.id}")

    emit(as_json, [f.to_dict() for f in forwards], human)


@port.command("close")
@click.argument("name")
@click.argument("forward")
@json_option
def close(name: str, forward: str, as_json: bool) -> None:
    """Close a forward, named by its host port or its id (its connections are reset)."""
    target: str | int = int(forward) if forward.isdigit() else forward
    connect(name).ports.close(target)
    emit(as_json, {"closed": forward}, f"closed {forward}")


@click.group()
def network() -> None:
    """The network policy of a running sandbox."""


@network.command("show")
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Mode, egress allow-list and forwards."""
    info = connect(name).describe()
    policy = info.network

    def human() -> None:
        click.echo(f"mode     {policy.get('mode')}  ({info.details.get('network', '')})")
        click.echo(f"allow    {', '.join(policy.get('allow') or []) or '-'}"
                   + ("  (wildcards allowed)" if policy.get("allow_wildcards") else ""))
        egress = policy.get("egress")
        if egress:
            click.echo(f"egress   proxy {egress['proxy']}: {egress['allowed']} allowed, {egress['refused']} refused")
        for f in policy.get("forwards") or []:
            click.echo(f"forward  {f['host']}:{f['host_port']} -> guest {f['guest_port']} ({f['id']})")

    emit(as_json, {**policy, "interface": info.details.get("network")}, human)


@network.command("update")
@click.argument("name")
@click.option("--allow", "allow", multiple=True, help="HOST:PORT the sandbox may reach (repeatable).")
@click.option("--deny", "deny", is_flag=True, help="Remove every entry: no egress at all.")
@click.option("--allow-wildcards", is_flag=True, help="Accept *.domain, * and CIDR entries.")
@json_option
def update(name: str, allow: tuple[str, ...], deny: bool, allow_wildcards: bool, as_json: bool) -> None:
    """Replace the egress allow-list of a running sandbox (new connections follow it)."""
    if deny and allow:
        raise errors.InvalidArgument("--deny", "cannot be combined with --allow")
    if not deny and not allow:
        raise errors.InvalidArgument("--allow", "give at least one HOST:PORT (or --deny)")
    policy = connect(name).network.update(list(allow), mode="deny" if deny else "allow",
                                                  allow_wildcards=allow_wildcards)
    emit(as_json, policy, f"mode {policy['mode']}: egress to {', '.join(policy['allow']) or 'nothing'}")
