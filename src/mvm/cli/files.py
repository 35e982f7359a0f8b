"""``mvmctl fs read | write | ls | stat | mkdir | rm | mv``."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from ..protocol.requests import DEFAULT_MAX_READ_BYTES
from .common import connect, emit, json_option

if TYPE_CHECKING:
    from ..sdk.models import FileEntry


def register(cli: click.Group) -> None:
    cli.add_command(fs)


@click.group()
def fs() -> None:
    """Files in a sandbox (guest paths are absolute; --user acts as a guest account)."""


#: ``--user``: every ``fs`` verb acts as this guest account (``files.*(user=...)``).
user_option = click.option("--user", "-u", help="Act as this guest user (name or uid), with its permissions.")


@fs.command("read")
@click.argument("name")
@click.argument("path")
@click.option("--max-bytes", type=int, default=DEFAULT_MAX_READ_BYTES, show_default=True)
@user_option
def read(name: str, path: str, max_bytes: int, user: str | None) -> None:
    """Write the guest file PATH to stdout (bytes are untrusted: pipe with care)."""
    sys.stdout.buffer.write(connect(name).files.read(path, max_bytes=max_bytes, user=user))
    sys.stdout.buffer.flush()


@fs.command("write")
@click.argument("name")
@click.argument("path")
@click.option("--content", help="The file's content (default: read stdin).")
@click.option("--mode", default="644", show_default=True, help="Octal permission bits.")
@user_option
@json_option
def write(name: str, path: str, content: str | None, mode: str, user: str | None, as_json: bool) -> None:
    """Write PATH in the sandbox from --content or stdin."""
    data = content.encode() if content is not None else sys.stdin.buffer.read()
    entry = connect(name).files.write(path, data, mode=int(mode, 8), user=user)
    emit(as_json, entry.to_dict(), f"wrote {entry.size} bytes to {path}")


def _entry_line(e: FileEntry) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
    suffix = "/" if e.type == "dir" else (f" -> {e.symlink_target}" if e.symlink_target else "")
    return f"{e.mode:04o} {e.type:<7} {e.size:>10} {stamp} {e.name}{suffix}"


@fs.command("ls")
@click.argument("name")
@click.argument("path", default="/")
@user_option
@json_option
def ls(name: str, path: str, user: str | None, as_json: bool) -> None:
    """List a guest directory."""
    entries = connect(name).files.list(path, user=user)
    emit(as_json, [e.to_dict() for e in entries], "\n".join(_entry_line(e) for e in entries))


@fs.command("stat")
@click.argument("name")
@click.argument("path")
@user_option
@json_option
def stat(name: str, path: str, user: str | None, as_json: bool) -> None:
    entry = connect(name).files.stat(path, user=user)
    emit(as_json, entry.to_dict(), _entry_line(entry))


@fs.command("mkdir")
@click.argument("name")
@click.argument("path")
@click.option("--parents/--no-parents", "-p", default=True, show_default=True)
@user_option
@json_option
def mkdir(name: str, path: str, parents: bool, user: str | None, as_json: bool) -> None:
    connect(name).files.mkdir(path, parents=parents, user=user)
    emit(as_json, {"path": path}, None)


@fs.command("rm")
@click.argument("name")
@click.argument("path")
@click.option("--recursive", "-r", is_flag=True)
@user_option
@json_option
def rm(name: str, path: str, recursive: bool, user: str | None, as_json: bool) -> None:
    connect(name).files.remove(path, recursive=recursive, user=user)
    emit(as_json, {"removed": path}, None)


@fs.command("mv")
@click.argument("name")
@click.argument("src")
@click.argument("dst")
@click.option("--overwrite", is_flag=True)
@user_option
@json_option
def mv(name: str, src: str, dst: str, overwrite: bool, user: str | None, as_json: bool) -> None:
    connect(name).files.move(src, dst, overwrite=overwrite, user=user)
    emit(as_json, {"src": src, "dst": dst}, None)
