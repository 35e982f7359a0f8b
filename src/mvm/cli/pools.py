"""``mvmctl pool up | ls | down``: warm pools of pre-started sandboxes (mvm.pool)."""

from __future__ import annotations

import signal
import threading
import time

import click

from ..pooling.store import DEFAULT_MEMBER_TTL, POOL_BACKENDS
from ..spec import DEFAULT_TEMPLATE
from ..sdk.policy import network as make_network
from ..sdk.policy import resources as make_resources
from ..sdk.pool import DEFAULT_POOL_SIZE, PoolInfo, close_pool, pool, pools
from .common import asked_resources, emit, json_option, shape_options


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
@click.option("--backend", default=POOL_BACKENDS[0], show_default=True)
@shape_options
@click.option("--keep-filled", is_flag=True,
              help="Stay in the foreground refilling the pool after each claim; close it on Ctrl-C / SIGTERM.")
@json_option
def up(
    template: str,
    size: int,
    ttl: str,
    backend: str,
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
    destroyed = close_pool(pool_id)
    emit(as_json, {"id": pool_id, "destroyed": destroyed, "closed_at": time.time()},
         f"closed {pool_id} ({destroyed} waiting members destroyed)")


def _print(as_json: bool, info: PoolInfo) -> None:
    emit(as_json, info.to_wire(), f"{info.id}\t{info.template}\t{info.backend}\t{len(info.ready)}/{info.size} ready")
