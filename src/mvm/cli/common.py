"""Output and option helpers shared by every ``mvmctl`` command module."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from .. import errors


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


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
