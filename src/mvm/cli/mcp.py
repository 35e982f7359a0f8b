"""``mvmctl mcp``: serve sandboxes as MCP tools (stdio, or streamable HTTP on 127.0.0.1)."""

from __future__ import annotations

import click

from .. import errors


@click.command("mcp")
@click.option("--max-sandboxes", type=int, default=4, show_default=True, help="Live sandboxes the model may hold.")
@click.option("--template", "templates", multiple=True, help="A template the model may use (repeat).")
@click.option("--network", default="deny", show_default=True, help="deny | allow:HOST:PORT,... (the widest).")
@click.option("--backend", default=None, help="vm | namespace (default: the strongest available).")
@click.option("--http", "http_port", type=int, default=None, help="Streamable HTTP on 127.0.0.1:PORT.")
@click.option("--token", envvar="MVM_MCP_TOKEN", default=None, help="Bearer token for --http.")
def mcp_command(
    max_sandboxes: int, templates: tuple[str, ...], network: str, backend: str | None, http_port: int | None,
    token: str | None,
) -> None:
    """Serve mvm sandboxes to an MCP client (create, run, files, ports, snapshots, destroy)."""
    try:
        from ..integrations.mcp.server import OperatorPolicy, serve_http, serve_stdio
    except ImportError as exc:
        raise errors.InvalidState(f"mvmctl mcp needs the mcp extra: pip install 'mvm[mcp]' ({exc})") from None
    policy = OperatorPolicy.parse(max_sandboxes, templates, network, backend)
    if http_port is None:
        serve_stdio(policy)
    else:
        serve_http(policy, port=http_port, token=token, announce=lambda line: click.echo(line, err=True))


def register(cli: click.Group) -> None:
    cli.add_command(mcp_command)
