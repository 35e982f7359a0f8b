"""``mvmctl proc start | ls | wait | kill | attach``."""

from __future__ import annotations

import sys

import click

from .common import connect, emit, json_option, parse_env


def register(cli: click.Group) -> None:
    cli.add_command(proc)


@click.group()
def proc() -> None:
    """Long-running processes in a sandbox."""


@proc.command("start", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "-e", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--cwd")
@json_option
def start(name: str, argv: tuple[str, ...], env: tuple[str, ...], cwd: str | None, as_json: bool) -> None:
    """Start ARGV in sandbox NAME and print its pid."""
    process = connect(name).commands.start(list(argv), env=parse_env(env), cwd=cwd)
    emit(as_json, {"pid": process.pid, "audit_id": process.audit_id}, str(process.pid))


@proc.command("ls")
@click.argument("name")
@json_option
def ls(name: str, as_json: bool) -> None:
    """List the sandbox's processes."""
    procs = connect(name).commands.list()

    def human() -> None:
        click.echo(f"{'PID':>7} {'STATE':<8} {'EXIT':>5} ARGV")
        for p in procs:
            state = "running" if p.running else "exited"
            code = "" if p.exit_code is None else str(p.exit_code)
            click.echo(f"{p.pid:>7} {state:<8} {code:>5} {' '.join(p.argv)}")

    emit(as_json, [p.__dict__ for p in procs], human)


@proc.command("wait")
@click.argument("name")
@click.argument("pid", type=int)
@click.option("--timeout", type=float, default=None)
@json_option
def wait(name: str, pid: int, timeout: float | None, as_json: bool) -> None:
    """Wait for PID to exit; its exit status becomes ours."""
    code = connect(name).commands.connect(pid).wait(timeout=timeout)
    emit(as_json, {"pid": pid, "exit_code": code}, None)
    sys.exit(code if 0 <= code < 256 else 1)


@proc.command("kill")
@click.argument("name")
@click.argument("pid", type=int)
@click.option("--signal", "sig", default="KILL", show_default=True, help="TERM, KILL, INT or HUP")
@json_option
def kill(name: str, pid: int, sig: str, as_json: bool) -> None:
    """Signal PID's process group (default SIGKILL)."""
    connect(name).commands.connect(pid).signal(sig)
    emit(as_json, {"pid": pid, "signal": sig}, f"sent {sig} to {pid}")


@proc.command("attach")
@click.argument("name")
@click.argument("pid", type=int)
def attach(name: str, pid: int) -> None:
    """Print PID's output (from its start) until it exits."""
    process = connect(name).commands.connect(pid)
    for stream, text in process.output():
        (sys.stdout if stream == "stdout" else sys.stderr).write(text)
        (sys.stdout if stream == "stdout" else sys.stderr).flush()
    sys.exit(max(0, min(255, process.wait())))
