"""Output and option helpers shared by every ``mvmctl`` command module."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .. import errors
from ..spec import NETWORK_MODES, Resources

if TYPE_CHECKING:
    from ..sdk.sandbox import Sandbox


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


def connect(name: str) -> Sandbox:
    """``Sandbox.connect(name)``. The SDK loads here, when a command runs, not when
    ``mvmctl`` starts: ``--help`` and the commands that need no sandbox do not pay for it."""
    from ..sdk.sandbox import Sandbox

    return Sandbox.connect(name)


def emit(as_json: bool, data: Any, human: Callable[[], None] | str | None = None) -> None:
    """Print ``data`` as JSON, or the human form."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif callable(human):
        human()
    elif human is not None:
        click.echo(human)


def parse_env(pairs: tuple[str, ...], field: str = "--env") -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise errors.InvalidArgument(field, f"{pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def shape_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What a sandbox is made of: ``--cpus --memory --disk --max-processes`` (None when not
    given) and ``--network --allow --allow-wildcards`` (``mvmctl up``, ``mvmctl pool up``)."""
    options = [
        click.option("--cpus", type=float, default=None, help=f"[default: {Resources.cpu_cores:g}, or the snapshot's]"),
        click.option("--memory", "memory_mb", type=int, default=None,
                     help=f"MiB [default: {Resources.memory_mb}, or the snapshot's]"),
        click.option("--disk", "rootfs_size_mb", type=int, default=None,
                     help=f"Writable disk, MiB [default: {Resources.rootfs_size_mb}, or the snapshot's]"),
        click.option("--max-processes", type=int, default=None,
                     help=f"[default: {Resources.max_processes}, or the snapshot's]"),
        click.option("--network", "network_mode", type=click.Choice(NETWORK_MODES), default="deny",
                     show_default=True),
        click.option("--allow", multiple=True, help="host:port allowed with --network allow (repeatable)."),
        click.option("--allow-wildcards", is_flag=True,
                     help="Accept *.domain, *, 0.0.0.0/:: and CIDR --allow entries."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def asked_resources(
    cpus: float | None, memory_mb: int | None, rootfs_size_mb: int | None, max_processes: int | None
) -> dict[str, Any]:
    """The ``shape_options`` resources that were given."""
    asked = {"cpu_cores": cpus, "memory_mb": memory_mb, "rootfs_size_mb": rootfs_size_mb,
             "max_processes": max_processes}
    return {key: value for key, value in asked.items() if value is not None}
