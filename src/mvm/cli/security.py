"""``mvmctl secret set|ls|rm``, ``mvmctl audit tail|show|verify``, ``mvmctl receipt verify|prune``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .. import errors
from .common import emit, json_option

# The keystore, audit log and receipt code (and their cryptography) load inside the commands.


def register(cli: click.Group) -> None:
    cli.add_command(secret)
    cli.add_command(audit)
    cli.add_command(receipt)


# ---- secrets -------------------------------------------------------------------


@click.group()
def secret() -> None:
    """The host keystore (values encrypted at rest; never shown)."""


@secret.command("set")
@click.argument("name")
@json_option
def secret_set(name: str, as_json: bool) -> None:
    """Store secret NAME, reading its value from stdin (or a hidden prompt), never an argument."""
    if sys.stdin.isatty():
        value = click.prompt(f"value for {name}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
    if not value:
        raise errors.InvalidArgument("value", "is empty (pipe it on stdin or type it at the prompt)")
    from ..security.secrets import Keystore

    record = Keystore().set(name, value)
    emit(as_json, record, f"stored secret {name}")


@secret.command("ls")
@json_option
def secret_ls(as_json: bool) -> None:
    """Names and timestamps only."""
    from ..security.secrets import Keystore

    rows = Keystore().names()
    emit(as_json, rows, "\n".join(f"{r['name']}\tupdated {r['updated_at']}" for r in rows) or "no secrets")


@secret.command("rm")
@click.argument("name")
@json_option
def secret_rm(name: str, as_json: bool) -> None:
    from ..security.secrets import Keystore

    Keystore().remove(name)
    emit(as_json, {"removed": name}, f"removed secret {name}")


# ---- audit ---------------------------------------------------------------------


def _audit_path(name_or_id: str) -> Path:
    """A running sandbox's log by name or id, or a destroyed one's by id."""
    from ..security import audit as audit_log
    from ..supervisor.state import find_sandbox

    path = audit_log.log_path(name_or_id) if name_or_id.startswith("sb-") else None
    if path is not None and path.exists():
        return path
    try:
        _, record = find_sandbox(name_or_id)
    except errors.SandboxNotFound:
        known = sorted(p.stem for p in audit_log.audit_dir().glob("sb-*.jsonl"))
        raise errors.InvalidArgument(
            "NAME", f"no audit log for {name_or_id!r}", allowed=", ".join(known) or "no audit logs yet"
        ) from None
    return audit_log.log_path(record["id"])


def _entry_line(entry: dict[str, object]) -> str:
    outcome = entry.get("outcome")
    error = f" {entry['error_type']}" if entry.get("error_type") else ""
    actor = entry.get("actor") or {}
    who = f"{actor.get('user', '?')}/{actor.get('pid', '?')}" if isinstance(actor, dict) else "?"
    return (
        f"{entry.get('seq'):>5} {entry.get('ts')} {entry.get('audit_id')} "
        f"{entry.get('op'):<16} {outcome}{error} by {who}"
    )


@click.group()
def audit() -> None:
    """The signed, hash-chained audit log of each sandbox."""


@audit.command("tail")
@click.argument("name")
@click.option("-n", "count", type=int, default=20, show_default=True)
@click.option("--follow", "-f", is_flag=True)
@json_option
def audit_tail(name: str, count: int, follow: bool, as_json: bool) -> None:
    from ..security import audit as audit_log

    path = _audit_path(name)
    entries = audit_log.follow(path, last=count) if follow else audit_log.tail(path, count)
    try:
        for entry in entries:
            click.echo(json.dumps(entry, sort_keys=True) if as_json else _entry_line(entry))
    except KeyboardInterrupt:
        pass


@audit.command("show")
@click.argument("audit_id")
@json_option
def audit_show(audit_id: str, as_json: bool) -> None:
    """Print the entry recorded under AUDIT_ID (from any sandbox, also destroyed ones)."""
    from ..security import audit as audit_log

    entry = audit_log.find(audit_id)
    emit(as_json, entry, lambda: click.echo(json.dumps(entry, indent=2, sort_keys=True)))


@audit.command("verify")
@click.argument("name", required=False)
@json_option
def audit_verify(name: str | None, as_json: bool) -> None:
    """Check the chain and signatures (one sandbox, or every log); exit 1 on any problem."""
    from ..security import audit as audit_log

    paths = [_audit_path(name)] if name else sorted(audit_log.audit_dir().glob("sb-*.jsonl"))
    reports = []
    for path in paths:
        report = audit_log.verify(path)
        reports.append({"log": str(path), **report.to_dict()})
        if not as_json:
            if report.ok:
                click.echo(f"ok   {path.stem}: {report.entries} entries")
            else:
                click.echo(f"FAIL {path.stem}: entry {report.first_bad_seq}: {report.problem}")
    if as_json:
        click.echo(json.dumps(reports, indent=2))
    if not all(r["ok"] for r in reports):
        sys.exit(1)


# ---- receipts ------------------------------------------------------------------


@click.group()
def receipt() -> None:
    """Signed receipts of commands.run / mvmctl exec."""


@receipt.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--stdout",
    "stdout_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Also check this file holds the recorded stdout.",
)
@json_option
def receipt_verify(path: str, stdout_file: str | None, as_json: bool) -> None:
    from ..security.receipts import verify_receipt

    stdout = Path(stdout_file).read_bytes() if stdout_file else None
    check = verify_receipt(path, stdout=stdout)
    emit(
        as_json,
        {"ok": check.ok, "problem": check.problem, "checked_at": time.time()},
        "ok" if check.ok else f"FAIL: {check.problem}",
    )
    if not check.ok:
        sys.exit(1)


@receipt.command("prune")
@click.option("--older-than", "older_than", required=True, metavar="DURATION",
              help='Remove the receipts written more than this long ago ("30d", "12h", "2w", seconds).')
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@json_option
def receipt_prune(older_than: str, dry_run: bool, as_json: bool) -> None:
    """Remove old receipts from this host's receipt directory (every commands.run leaves
    one there; nothing else removes them)."""
    from ..security.receipts import prune_receipts

    report = prune_receipts(older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    emit(as_json, {**report._asdict(), "dry_run": dry_run, "older_than": older_than},
         f"{verb} {report.removed} receipt(s) ({report.removed_bytes / 2**20:.1f} MiB) written more than "
         f"{older_than} ago; kept {report.kept}")
