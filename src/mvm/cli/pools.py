"""``mvmctl pool up | ls | down``: warm pools of pre-started sandboxes (mvm.pool)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import click

from .. import errors
from ..pooling.store import DEFAULT_MEMBER_TTL, DEFAULT_POOL_SIZE
from ..spec import DEFAULT_TEMPLATE, NetworkPolicy, Resources
from .common import asked_resources, emit, json_option, shape_options

if TYPE_CHECKING:
    from ..sdk.pool import Pool, PoolInfo

# The SDK's pool code loads inside the commands (not at `mvmctl` start-up).


def register(cli: click.Group) -> None:
    cli.add_command(pool_group)


@click.group("pool")
def pool_group() -> None:
    """Warm pools: pre-started sandboxes that a matching `mvmctl up` / create claims."""


@pool_group.command("up")
@click.option("--template", "-t", default=DEFAULT_TEMPLATE, show_default=True)
@click.option("--size", type=int, default=DEFAULT_POOL_SIZE, show_default=True, help="Members kept waiting (1-16).")
@click.option("--ttl", default=DEFAULT_MEMBER_TTL, show_default=True,
              help="How long an unclaimed member waits (1s-24h) before it ends itself.")
@click.option("--backend", help="One whose sandboxes a pool can pre-start (default: the first such backend).")
@shape_options
@click.option("--keep-filled", is_flag=True,
              help="Stay in the foreground refilling the pool after each claim; close it on Ctrl-C / SIGTERM.")
@json_option
def up(
    template: str,
    size: int,
    ttl: str,
    backend: str | None,
    cpus: float | None,
    memory_mb: int | None,
    rootfs_size_mb: int | None,
    max_processes: int | None,
    network_mode: str,
    allow: tuple[str, ...],
    allow_wildcards: bool,
    keep_filled: bool,
    as_json: bool,
) -> None:
    """Start a pool and print it. Without --keep-filled it returns once SIZE members wait;
    nothing refills them and each ends itself at its TTL (or `mvmctl pool down`)."""
    from ..sdk.policy import network as make_network
    from ..sdk.policy import resources as make_resources
    from ..sdk.pool import pool

    asked = asked_resources(cpus, memory_mb, rootfs_size_mb, max_processes)
    made = pool(template, size=size, ttl=ttl, backend=backend, resources=make_resources(**asked) if asked else None,
                network=make_network(network_mode, list(allow), allow_wildcards=allow_wildcards),
                refill=keep_filled)
    if not keep_filled:
        try:
            made.fill()
        except BaseException:
            made.close()
            raise
        made.detach()
        _print(as_json, made.describe())
        return
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        _print(as_json, made.wait_ready())
        while not stop.wait(0.5) and not made.closed:  # closed: `mvmctl pool down` from elsewhere
            pass
    finally:
        made.close()


@pool_group.command("ls")
@json_option
def ls(as_json: bool) -> None:
    """List the pools of this MVM_HOME: what each serves, its waiting members, its owner."""
    from ..sdk.pool import pools

    infos = pools()

    def human() -> None:
        click.echo(f"{'ID':<14} {'TEMPLATE':<14} {'BACKEND':<10} {'READY':<7} {'TTL':<7} REFILLED BY")
        for i in infos:
            owner = f"pid {i.owner_pid}" if i.refilling else "nobody (members expire)"
            click.echo(f"{i.id:<14} {i.template:<14} {i.backend:<10} {len(i.ready)}/{i.size:<5} "
                       f"{i.ttl_seconds:<7} {owner}")

    emit(as_json, [i.to_wire() for i in infos], human)


@pool_group.command("down")
@click.argument("pool_id")
@json_option
def down(pool_id: str, as_json: bool) -> None:
    """Close POOL_ID: its waiting members are destroyed (claimed sandboxes go on)."""
    from ..sdk.pool import close_pool

    destroyed = close_pool(pool_id)
    emit(as_json, {"id": pool_id, "destroyed": destroyed, "closed_at": time.time()},
         f"closed {pool_id} ({destroyed} waiting members destroyed)")


#: What ``mvmctl pool hold`` passes on to ``mvm.pool`` (the rest take ``mvm.pool``'s defaults).
_HOLD_ARGUMENTS = ("template", "size", "ttl", "backend", "resources", "network", "refill")


@pool_group.command("hold", hidden=True)
@json_option
def hold(as_json: bool) -> None:
    """For the TypeScript SDK's ``pool()``: make a pool with ``mvm.pool`` from the JSON
    arguments on stdin's first line (so its checks, defaults and messages are Python's),
    print ``{"result": {"pool", "recorded", "refused_options"}}``, then answer one JSON request per line
    (``describe``, ``wait_ready``, ``close``) until ``close`` or the end of stdin: the
    process that holds the other end exited, and this one exits as a Python program
    owning the pool would (a refilled pool is closed, ``refill: false`` members wait)."""
    from ..sdk.pool import POOL_OWN_OPTIONS, pool, refused_option

    asked = json.loads(sys.stdin.readline() or "{}")
    if not isinstance(asked, dict):
        raise errors.InvalidArgument("pool", "the arguments must be a JSON object", allowed=list(_HOLD_ARGUMENTS))
    unknown = sorted(set(asked) - set(_HOLD_ARGUMENTS))
    if unknown:
        raise errors.InvalidArgument(unknown[0], "is not an argument of pool()", allowed=list(_HOLD_ARGUMENTS))
    if isinstance(asked.get("resources"), dict):
        asked["resources"] = Resources.from_json(asked["resources"])
    if isinstance(asked.get("network"), dict):
        asked["network"] = NetworkPolicy.from_json(asked["network"])
    made = pool(**asked)
    _answer({"result": {"pool": made.describe().to_wire(), "recorded": made.recorded,
                        "refused_options": {key: refused_option(key).to_wire() for key in POOL_OWN_OPTIONS}}})
    while line := sys.stdin.readline():
        try:
            request = json.loads(line)
            op = request.get("op") if isinstance(request, dict) else None
            _answer({"result": _held(made, op, request)})
        except errors.MvmError as exc:
            _answer({"error": exc.to_wire()})
            continue
        except ValueError:
            _answer({"error": errors.InvalidArgument("request", "is not JSON").to_wire()})
            continue
        if op == "close":
            return


def _held(made: Pool, op: Any, request: dict[str, Any]) -> dict[str, Any]:
    if op == "describe":
        return made.describe().to_wire()
    if op == "wait_ready":
        timeout = request.get("timeout")
        return (made.wait_ready() if timeout is None else made.wait_ready(float(timeout))).to_wire()
    if op == "close":
        made.close()
        return {}
    raise errors.InvalidArgument("op", f"unknown request {op!r}", allowed=["describe", "wait_ready", "close"])


def _answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _print(as_json: bool, info: PoolInfo) -> None:
    emit(as_json, info.to_wire(), f"{info.id}\t{info.template}\t{info.backend}\t{len(info.ready)}/{info.size} ready")
