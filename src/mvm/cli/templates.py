"""``mvmctl template build | ls | rm``."""

from __future__ import annotations

import click

from ..templates import available_templates, ensure_template, list_templates, remove_template
from .common import emit, json_option


def register(cli: click.Group) -> None:
    cli.add_command(template)


@click.group()
def template() -> None:
    """Sandbox templates (Debian root filesystems with the mvm agent)."""


@template.command("build")
@click.argument("names", nargs=-1)
@json_option
def build(names: tuple[str, ...], as_json: bool) -> None:
    """Build (or find cached) templates; shows progress on a terminal."""
    built = []
    for name in names or ("python-3.13",):
        image = ensure_template(name)
        built.append({"name": image.name, "digest": image.digest, "path": str(image.directory)})
    emit(as_json, built, "\n".join(f"{b['name']}\t{b['digest'][:16]}\t{b['path']}" for b in built))


@template.command("ls")
@click.option("--available", is_flag=True, help="List the names this host can build instead.")
@json_option
def ls(available: bool, as_json: bool) -> None:
    if available:
        names = available_templates()
        emit(as_json, names, "\n".join(names))
        return
    rows = list_templates()

    def human() -> None:
        click.echo(f"{'NAME':<14} {'DIGEST':<18} {'SIZE':>10}  PATH")
        for r in rows:
            click.echo(f"{r['name']:<14} {str(r['digest'])[:16]:<18} {r.get('size', 0):>10}  {r['path']}")

    emit(as_json, rows, human)


@template.command("rm")
@click.argument("name")
@json_option
def rm(name: str, as_json: bool) -> None:
    count = remove_template(name)
    emit(as_json, {"name": name, "removed": count}, f"removed {count} build(s) of {name}")
