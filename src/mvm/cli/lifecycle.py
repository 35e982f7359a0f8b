"""``mvmctl stop | start | pause | resume | snapshot save|restore|ls|rm|prune``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from .common import connect, emit, json_option

if TYPE_CHECKING:
    from ..sdk.models import SandboxInfo


def register(cli: click.Group) -> None:
    for command in (stop, start, pause, resume, snapshot):
        cli.add_command(command)


def _state_line(info: SandboxInfo) -> str:
    return f"{info.name}\t{info.state}"


@click.command()
@click.argument("name")
@json_option
def stop(name: str, as_json: bool) -> None:
    """Halt the sandbox's processes, keep its disk."""
    info = connect(name).stop()
    emit(as_json, info.to_dict(), _state_line(info))


@click.command()
@click.argument("name")
@json_option
def start(name: str, as_json: bool) -> None:
    """Start a stopped sandbox again."""
    info = connect(name).start()
    emit(as_json, info.to_dict(), _state_line(info))


@click.command()
@click.argument("name")
@json_option
def pause(name: str, as_json: bool) -> None:
    """Freeze all execution in the sandbox."""
    info = connect(name).pause()
    emit(as_json, info.to_dict(), _state_line(info))


@click.command()
@click.argument("name")
@click.option("--snapshot", help="Restore this snapshot instead of continuing.")
@json_option
def resume(name: str, snapshot: str | None, as_json: bool) -> None:
    """Continue a paused sandbox (or restore a snapshot into it)."""
    info = connect(name).resume(snapshot=snapshot)
    emit(as_json, info.to_dict(), _state_line(info))


@click.group()
def snapshot() -> None:
    """Sealed snapshots of sandboxes."""


@snapshot.command("save")
@click.argument("name")
@click.argument("snapshot_name", required=False)
@click.option("--expires", default=None, help='Retention, e.g. "24h" (default: the configured default).')
@click.option("--keep", is_flag=True, help="Survive the sandbox's destroy.")
@json_option
def save(name: str, snapshot_name: str | None, expires: str | None, keep: bool, as_json: bool) -> None:
    snap = connect(name).snapshot(snapshot_name, expires=expires, keep=keep)
    emit(as_json, snap.to_dict(), f"{snap.id}\t{snap.name}\t{snap.kind}\t{snap.size_bytes} bytes")


@snapshot.command("restore")
@click.argument("name")
@click.argument("snapshot_ref")
@json_option
def restore(name: str, snapshot_ref: str, as_json: bool) -> None:
    """Replace sandbox NAME's state with SNAPSHOT_REF (id or name)."""
    from ..snapshots import SnapshotStore

    snap_id = SnapshotStore().get(snapshot_ref).id
    info = connect(name).resume(snapshot=snap_id)
    emit(as_json, info.to_dict(), _state_line(info))


@snapshot.command("ls")
@json_option
def snapshot_ls(as_json: bool) -> None:
    from ..snapshots import SnapshotStore

    snaps = SnapshotStore().list()

    def human() -> None:
        click.echo(f"{'ID':<22} {'NAME':<20} {'KIND':<10} {'SANDBOX':<14} {'SIZE':>10} {'AGE':>7} EXPIRES")
        now = time.time()
        for s in snaps:
            expires = f"{int(s.expires_at - now)}s" if s.expires_at else "never"
            click.echo(
                f"{s.id:<22} {s.name:<20} {s.kind:<10} {s.sandbox_id:<14} {s.size_bytes:>10} "
                f"{int(now - s.created_at):>6}s {expires}"
            )

    emit(as_json, [s.to_wire() for s in snaps], human)


@snapshot.command("rm")
@click.argument("snapshot_ref")
@json_option
def snapshot_rm(snapshot_ref: str, as_json: bool) -> None:
    from ..snapshots import SnapshotStore

    store = SnapshotStore()
    snap_id = store.get(snapshot_ref).id
    store.remove(snap_id)
    emit(as_json, {"removed": snap_id}, f"removed {snap_id}")


@snapshot.command("prune")
@json_option
def prune(as_json: bool) -> None:
    """Delete every expired snapshot."""
    from ..snapshots import SnapshotStore

    removed = SnapshotStore().prune(time.time())
    emit(as_json, {"removed": [i.to_wire() for i in removed]}, f"removed {len(removed)} expired snapshot(s)")
