"""``mvmctl compile | run | ir``: a workload script recorded, planned or run live; the IR.

    mvmctl compile ./sandbox.py --out /tmp/sandbox-ir      # or --out sandbox.tar.gz
    mvmctl run --mode plan ./sandbox.py                    # exit 0: admitted, 1: not admitted
    mvmctl run --mode live ./sandbox.py                    # the script's exit status passes through
    mvmctl ir validate /tmp/sandbox-ir
    mvmctl ir show /tmp/sandbox-ir
    mvmctl up --from-ir /tmp/sandbox-ir                    # (in mvm.cli.sandboxes)

Arguments after SCRIPT that mvmctl does not know go to the script (put them after
``--`` to be sure).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..modes import DEFAULT_RECORD_TIMEOUT
from .common import emit, json_option

# The modes' code (and its JSON Schema validator) loads inside the commands that use it.

_SCRIPT = click.Path(exists=True, dir_okay=False, path_type=Path)
_SCRIPT_ARGS = {"ignore_unknown_options": True}


def register(cli: click.Group) -> None:
    cli.add_command(compile_)
    cli.add_command(run)
    cli.add_command(ir_group)


def _timeout_option(fn: Any) -> Any:
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_RECORD_TIMEOUT,
                        show_default=True, help="Record/plan mode: seconds the script may run.")(fn)


@click.command("compile", context_settings=_SCRIPT_ARGS)
@click.argument("script", type=_SCRIPT)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Output directory, or a .tar.gz file (byte-identical for the same input).")
@_timeout_option
@json_option
def compile_(script: Path, script_args: tuple[str, ...], out: Path, timeout: float, as_json: bool) -> None:
    """Record SCRIPT (nothing boots) and write its workload IR, plan and files to --out."""
    from ..modes import runner

    compiled = runner.compile_script(script, out, script_args, timeout=timeout)
    emit(as_json, compiled.to_dict(), compiled.summary(script))


@click.command("run", context_settings=_SCRIPT_ARGS)
@click.option("--mode", type=click.Choice(["plan", "live", "record"]), default="live", show_default=True,
              help="plan: record and admit (nothing boots); live: run for real; record: show the recording.")
@click.argument("script", type=_SCRIPT)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@_timeout_option
@json_option
def run(mode: str, script: Path, script_args: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Run SCRIPT in a mode. plan exits 0 when admitted, 1 with each reason otherwise;
    live passes the script's exit status through and tears down sandboxes it left running."""
    from ..modes import admission, ir, runner

    if mode == "plan":
        report = runner.plan_script(script, script_args, timeout=timeout)
        emit(as_json, report, admission.render_plan(report))
        sys.exit(0 if report["admitted"] else 1)
    if mode == "record":
        with runner.record_script(script, script_args, mode="record", timeout=timeout) as rec:
            workloads = rec.workloads()
            events = rec.recording.events
        data = {"events": events, "workloads": [{"sha256": ir.ir_hash(doc), "ir": doc} for doc, _ in workloads]}

        def human() -> None:
            for event in events:
                fields = {k: v for k, v in event.items() if k not in ("seq", "op", "sandbox", "at")}
                where = f"  [{event['at']}]" if event.get("at") else ""
                click.echo(f"{event['seq']:>3} sandbox {event.get('sandbox', 0) + 1} {event['op']}"
                           f" {json.dumps(fields, sort_keys=True)}{where}")
            for doc, _ in workloads:
                click.echo(f"workload {doc['workload_id'] or '(no id)'}: sha256 {ir.ir_hash(doc)}")

        emit(as_json, data, human)
        return
    result = runner.run_live(script, script_args)
    if not as_json:
        for sandbox_id, events in result.transcripts.items():
            _print_transcript(sandbox_id, events)
    for gone in result.torn_down:
        click.echo(f"mvmctl: destroyed sandbox {gone['name']} ({gone['id']}), which the script left running",
                   err=True)
    if as_json:
        click.echo(json.dumps({"exit_status": result.status, "run_id": result.run_id,
                               "torn_down": result.torn_down, "transcripts": result.transcripts}, sort_keys=True))
    sys.exit(result.status)


def _print_transcript(sandbox_id: str, events: list[dict[str, Any]]) -> None:
    """What a sandbox of the run did, from its (redacted) log, on stderr."""
    click.echo(f"mvmctl: sandbox {sandbox_id}:", err=True)
    start = events[0]["timestamp"] if events else 0.0
    for event in events:
        if event.get("source") == "audit":
            continue
        offset = f"+{(event['timestamp'] - start) * 1000:7.1f} ms"
        who = "" if event["source"] == "supervisor" else f"[{event['source']} {event['stream']}] "
        click.echo(f"  {offset}  {who}{event['message']}", err=True)


@click.group("ir")
def ir_group() -> None:
    """Inspect compiled workloads (a compile output directory or .tar.gz)."""


@ir_group.command("validate")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@json_option
def ir_validate(path: Path, as_json: bool) -> None:
    """Check the IR against schema/workload-v1.json, its consistency and every file's sha256."""
    from ..modes import ir

    with ir.open_ir(path) as loaded:
        doc = loaded.doc
        data = {"valid": True, "sha256": loaded.sha256, "version": doc["version"], "canonical": loaded.canonical,
                "included_files": len(doc["include"]["files"]), "operations": len(doc["operations"])}
    note = "" if loaded.canonical else " (workload.json is not in canonical form; the hash is of its canonical form)"
    emit(as_json, data, f"{path}: valid {doc['version']}, {data['included_files']} included files, "
                        f"{data['operations']} operations; sha256 {loaded.sha256}{note}")


@ir_group.command("show")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@json_option
def ir_show(path: Path, as_json: bool) -> None:
    """Show a compiled workload: what would boot and what it would do, checked against this host."""
    from ..modes import admission, ir

    with ir.open_ir(path) as loaded:
        doc = loaded.doc
        report = admission.make_plan([(doc, None)])
    if as_json:
        emit(True, {"sha256": loaded.sha256, "ir": doc, "plan": report})
        return
    click.echo(admission.render_plan(report))
