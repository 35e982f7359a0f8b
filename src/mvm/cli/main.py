"""``mvmctl``: the CLI twin of the SDK. Thin: parse, call the library, print.

Every verb takes ``--json`` (machine output on stdout). User errors print one
line on stderr and exit 2 (1 for runtime failures); never a traceback.
Command groups live in sibling modules, each with a ``register(cli)``.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

from .. import errors

#: Modules that add commands to the ``mvmctl`` group.
COMMAND_MODULES = (
    "mvm.cli.sandboxes",
    "mvm.cli.pools",
    "mvm.cli.processes",
    "mvm.cli.files",
    "mvm.cli.lifecycle",
    "mvm.cli.templates",
    "mvm.cli.doctor",
    "mvm.cli.security",
    "mvm.cli.modes",
    "mvm.cli.network",
    "mvm.cli.mcp",
)


class MvmGroup(click.Group):
    """Turns ``MvmError`` into a one-line message and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.MvmError as exc:
            as_json = "--json" in sys.argv
            if as_json:
                click.echo(json.dumps({"error": exc.to_wire()}), err=True)
            else:
                click.echo(f"error: {exc}", err=True)
            user_error = isinstance(
                exc,
                (
                    errors.InvalidArgument,
                    errors.TemplateNotFound,
                    errors.SandboxNotFound,
                    errors.SecretNotFound,
                    errors.InvalidState,
                    errors.FileError,
                    errors.ProcessNotFound,
                    errors.SnapshotNotFound,
                ),
            )
            ctx.exit(2 if user_error else 1)


@click.group(cls=MvmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mvm", prog_name="mvmctl")
def cli() -> None:
    """mvm: disposable, policy-bound sandboxes for untrusted code."""


def _load_commands() -> None:
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(cli)


_load_commands()


def main() -> None:
    cli(prog_name="mvmctl")


if __name__ == "__main__":
    main()
