"""``mvmctl template build | ls | rm | prune``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import InvalidArgument
from ..spec import DEFAULT_TEMPLATE
from .common import emit, json_option

if TYPE_CHECKING:
    from ..templates import TemplateImage

# The templates package (catalog, builder, OCI) loads inside the commands.


def register(cli: click.Group) -> None:
    cli.add_command(template)


@click.group()
def template() -> None:
    """Sandbox templates: Debian root filesystems, OCI images and Dockerfiles, with the mvm agent."""


@template.command("build")
@click.argument("names", nargs=-1)
@click.option("--from-image", "from_image", metavar="REF",
              help="Make a template from an OCI image (REGISTRY/REPO:TAG or @sha256:...); pulls it now.")
@click.option("--dockerfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Build a Dockerfile (with buildah) into a template; needs --name.")
@click.option("--context", type=click.Path(file_okay=False, path_type=Path),
              help="The Dockerfile's build context (default: its folder).")
@click.option("--name", help="Template name for --dockerfile (or --from-image; default oci:REF).")
@click.option("--creds-secret", metavar="SECRET",
              help="Keystore secret with the registry's 'user:password' (default: registry.<host>, if set).")
@json_option
def build(names: tuple[str, ...], from_image: str | None, dockerfile: Path | None, context: Path | None,
          name: str | None, creds_secret: str | None, as_json: bool) -> None:
    """Build (or find cached) templates; shows progress on a terminal.

    \b
    mvmctl template build python-3.13
    mvmctl template build --from-image 127.0.0.1:5000/team/app:1.2
    mvmctl template build --dockerfile ./Dockerfile --context . --name app
    """
    from ..templates import ensure_template, oci

    images: list[TemplateImage] = []
    if from_image and dockerfile:
        raise InvalidArgument("--from-image", "give --from-image or --dockerfile, not both")
    if from_image:
        images.append(oci.build_from_image(from_image, name=name, creds_secret=creds_secret))
    elif dockerfile:
        if not name:
            raise InvalidArgument("--name", "--dockerfile needs a template name", allowed="e.g. --name app")
        images.append(oci.build_from_dockerfile(dockerfile, name=name, context=context, creds_secret=creds_secret))
    elif name or context or creds_secret:
        raise InvalidArgument("--name", "--name, --context and --creds-secret go with --from-image or --dockerfile")
    for template_name in names or (() if images else (DEFAULT_TEMPLATE,)):
        images.append(ensure_template(template_name))
    built = [{"name": i.name, "digest": i.digest, "path": str(i.directory)} for i in images]
    emit(as_json, built, "\n".join(f"{b['name']}\t{b['digest'][:16]}\t{b['path']}" for b in built))


@template.command("ls")
@click.option("--available", is_flag=True, help="List the names this host can build instead.")
@json_option
def ls(available: bool, as_json: bool) -> None:
    """Built templates: name, digest, size, where they came from."""
    if available:
        from ..templates import available_templates

        names = available_templates()
        emit(as_json, names, "\n".join(names))
        return
    from ..templates import list_templates

    rows = list_templates()

    def human() -> None:
        width = max([14, *(len(r["name"]) for r in rows)])
        click.echo(f"{'NAME':<{width}} {'DIGEST':<16} {'SIZE':>9}  {'CURRENT':<7}  SOURCE")
        for r in rows:
            size = f"{(r.get('size') or 0) / 2**20:.1f}M"
            click.echo(f"{r['name']:<{width}} {str(r['digest'])[:16]:<16} {size:>9}  "
                       f"{'yes' if r['current'] else 'no':<7}  {r['source']}")

    emit(as_json, rows, human)


@template.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove even builds a sandbox uses.")
@json_option
def rm(name: str, force: bool, as_json: bool) -> None:
    """Remove every build of a template (refused while a sandbox uses one); shared image
    layers stay while another template uses them."""
    from ..templates import remove_template

    count = remove_template(name, force=force)
    emit(as_json, {"name": name, "removed": count}, f"removed {count} build(s) of {name}")


@template.command("prune")
@json_option
def prune(as_json: bool) -> None:
    """Remove builds that are not current and not in use, and image layers no template uses."""
    from ..templates import prune_templates

    count = prune_templates()
    emit(as_json, {"removed": count}, f"removed {count} build(s)")
