"""``mvmctl up | ls | describe | exec | logs | down``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TextIO
import os
import shutil
import sys
import threading
import time

import click

from .. import errors
from ..backends import backend_names
from ..protocol.requests import DEFAULT_MAX_OUTPUT_BYTES
from ..spec import DEFAULT_TEMPLATE, DEFAULT_TTL, Resources, create_defaults
from .common import asked_resources, connect, emit, json_option, parse_env, shape_options

# The SDK is imported inside each command, not here: `mvmctl --help` and the other
# commands (whose modules `mvmctl` imports at start-up) do not pay for it.


def register(cli: click.Group) -> None:
    cli.add_command(up)
    cli.add_command(create_server)
    cli.add_command(defaults)
    cli.add_command(ls)
    cli.add_command(describe)
    cli.add_command(exec_)
    cli.add_command(logs)
    cli.add_command(down)
    cli.add_command(gc)


@click.command()
@click.option("--name", help="Sandbox name (default: derived from the id).")
@click.option("--template", "-t", default=DEFAULT_TEMPLATE, show_default=True)
@click.option("--ttl", default=DEFAULT_TTL, show_default=True, help='Lifetime ("30m", "2h", seconds; "0" = none).')
@shape_options
@click.option("--auto-pause", help='Pause after this long idle, resume on the next request ("5m", seconds).')
@click.option("--backend", type=click.Choice(backend_names()), default=None)
@click.option("--env", "-e", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--secret-env", multiple=True, help="KEY=SECRET_NAME: env from the keystore (repeatable).")
@click.option("--include", multiple=True, help="Host path copied into /app (relative to the cwd).")
@click.option("--workload-id")
@click.option("--tag", "tag", multiple=True, help="KEY=VALUE label of the sandbox (repeatable).")
@click.option("--on-behalf-of", "on_behalf_of", multiple=True,
              help="KEY=VALUE naming who this create acts for (repeatable): audited with the creation.")
@click.option("--from-snapshot", help="Start from this snapshot id or name.")
@click.option(
    "--from-ir",
    "from_ir",
    type=click.Path(exists=True),
    help="Run a compiled workload (`mvmctl compile` output dir or .tar.gz): creates its sandbox and "
    "replays its writes and commands. Only --name and --backend apply with it.",
)
@json_option
def up(
    name: str | None,
    template: str,
    ttl: str,
    cpus: float | None,
    memory_mb: int | None,
    rootfs_size_mb: int | None,
    max_processes: int | None,
    network_mode: str,
    allow: tuple[str, ...],
    allow_wildcards: bool,
    auto_pause: str | None,
    backend: str | None,
    env: tuple[str, ...],
    secret_env: tuple[str, ...],
    include: tuple[str, ...],
    workload_id: str | None,
    tag: tuple[str, ...],
    on_behalf_of: tuple[str, ...],
    from_snapshot: str | None,
    from_ir: str | None,
    as_json: bool,
) -> None:
    """Create a sandbox and leave it running (until its TTL or `mvmctl down`)."""
    if from_ir is not None:
        from ..modes.runner import replay

        result = replay(from_ir, name=name, backend=backend, echo=None if as_json else click.echo)
        emit(as_json, result)
        return
    _start_zygote()
    info = _create_from(click.get_current_context().params)
    emit(as_json, info, f"{info['name']}\t{info['id']}\t{info['backend']}\t{info['isolation']}")


def _create_from(params: dict[str, object]) -> dict[str, object]:
    """``_create`` with ``up``'s parsed options (``up`` and ``create-server`` alike)."""
    return _create(**{key: value for key, value in params.items() if key not in _NOT_SERVED})  # type: ignore[arg-type]


def _create(name: str | None, template: str, ttl: str, cpus: float | None, memory_mb: int | None,
            rootfs_size_mb: int | None, max_processes: int | None, network_mode: str, allow: tuple[str, ...],
            allow_wildcards: bool, auto_pause: str | None, backend: str | None, env: tuple[str, ...],
            secret_env: tuple[str, ...], include: tuple[str, ...], workload_id: str | None, tag: tuple[str, ...],
            on_behalf_of: tuple[str, ...], from_snapshot: str | None) -> dict[str, object]:
    """``up``'s create (``create-server``'s too): the new sandbox's description."""
    from ..sdk.policy import network as make_network
    from ..sdk.policy import resources as make_resources
    from ..sdk.sandbox import Sandbox, snapshot_shape
    from ..security.secrets import SecretRef

    asked = asked_resources(cpus, memory_mb, rootfs_size_mb, max_processes)
    shape = None
    if asked:
        # flags not given keep the snapshot's values when restoring, the defaults otherwise
        base = snapshot_shape(from_snapshot) if from_snapshot is not None else Resources()
        shape = make_resources(**{**base.to_json(), **asked})
    full_env: dict[str, str | SecretRef] = dict(parse_env(env))
    full_env.update({k: SecretRef(v) for k, v in parse_env(secret_env, "--secret-env").items()})
    sandbox = Sandbox.create(
        template,
        name=name,
        workload_id=workload_id,
        ttl=None if ttl in ("0", "none") else ttl,
        include=list(include),
        backend=backend,
        env=full_env,
        from_snapshot=from_snapshot,
        tags=parse_env(tag, "--tag"),
        mode="live",
        resources=shape,
        network=make_network(network_mode, list(allow), allow_wildcards=allow_wildcards),
        auto_pause=auto_pause,
        on_behalf_of=parse_env(on_behalf_of, "--on-behalf-of") or None,
    )
    info = sandbox.describe()
    sandbox.close()
    return info.to_dict()


def _start_zygote() -> None:
    """Start this process's zygote now (``supervisor/zygote.py``; its first create would
    start it anyway), so that it imports the supervisor and the backends while this process
    imports the SDK and resolves the template, not after. A create that fails leaves
    nothing: the zygote ends with this process."""
    from ..supervisor.zygote import Zygote

    Zygote.shared()


#: ``up``'s parameters that ``create-server`` does not take (it answers JSON, and replays no IR).
_NOT_SERVED = ("as_json", "from_ir")


@click.command("create-server", hidden=True)
def create_server() -> None:
    """For the TypeScript SDK's ``Sandbox.create``: one process that makes all of a
    program's sandboxes, so only its first create pays Python's start, the imports and
    the zygote's start (a later one is a fork of the warm zygote, as in a Python program).

    Reads one JSON request per line, ``{"id": N, "args": [<mvmctl up's arguments>]}``,
    parsed and checked by ``up``'s own options, and answers each when its create ends (in
    any order: each runs on a thread of its own) with ``{"id": N, "result": <the sandbox's
    description>}`` or ``{"id": N, "error": <the wire error>}``. At the end of its stdin
    (the program holding the other end exited) it answers the creates under way, then ends."""
    writing = threading.Lock()

    def answer(message: dict[str, object]) -> None:
        with writing:
            sys.stdout.write(json.dumps(message, default=str) + "\n")
            sys.stdout.flush()

    def serve(ident: object, args: list[str]) -> None:
        try:
            if {"--help", "-h"} & set(args):  # (click would print the help among the answers)
                raise errors.InvalidArgument("args", "--help is not a create", allowed="mvmctl up's other options")
            params = up.make_context("up", list(args)).params
            if params.get("from_ir") is not None:
                raise errors.InvalidArgument("args", "--from-ir is not served by create-server",
                                             allowed="mvmctl up's other options")
            info = _create_from(params)
            answer({"id": ident, "result": info})
        except errors.MvmError as exc:
            answer({"id": ident, "error": exc.to_wire()})
        except click.ClickException as exc:
            field = getattr(getattr(exc, "param", None), "name", None) or "args"
            answer({"id": ident, "error": errors.InvalidArgument(field, exc.format_message()).to_wire()})
        except Exception as exc:  # a bug: answered, not a silent hang of the caller
            answer({"id": ident, "error": errors.SandboxError(f"create failed: {type(exc).__name__}: {exc}").to_wire()})

    _start_zygote()
    creates: list[threading.Thread] = []
    while line := sys.stdin.readline():
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        args = request.get("args") if isinstance(request, dict) else None
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            answer({"id": request.get("id") if isinstance(request, dict) else None,
                    "error": errors.InvalidArgument("request", "must be a JSON object with args: a list of strings",
                                                    allowed='{"id": N, "args": ["--template", "..."]}').to_wire()})
            continue
        thread = threading.Thread(target=serve, args=(request.get("id"), args), name="mvm-create")
        thread.start()
        creates = [*(t for t in creates if t.is_alive()), thread]  # (a long-lived program makes many)
    for thread in creates:
        thread.join()


@click.command()
@json_option
def defaults(as_json: bool) -> None:
    """What `up` (and each SDK's create) asks for where it names nothing."""
    values = create_defaults()
    emit(as_json, values, "\n".join(f"{key}\t{json.dumps(value)}" for key, value in values.items()))


@click.command()
@json_option
def ls(as_json: bool) -> None:
    """List this host's sandboxes; one whose supervisor died shows as "lost" (`mvmctl gc` removes it)."""
    from ..sdk.sandbox import Sandbox

    infos = Sandbox.list()

    def human() -> None:
        click.echo(f"{'NAME':<28} {'ID':<14} {'STATE':<9} {'BACKEND':<10} {'ISOLATION':<10} {'TEMPLATE':<12} EXPIRES")
        for i in infos:
            left = f"{int(i.expires_at - time.time())}s" if i.expires_at else "never"
            click.echo(
                f"{i.name:<28} {i.id:<14} {i.state:<9} {i.backend:<10} {i.isolation:<10} {i.template:<12} {left}"
            )

    emit(as_json, [i.to_dict() for i in infos], human)


@click.command()
@click.argument("name")
@json_option
def describe(name: str, as_json: bool) -> None:
    """Show a sandbox's state, limits, policy and isolation facts."""
    info = connect(name).describe()
    emit(as_json, info.to_dict(), lambda: click.echo(json.dumps(info.to_dict(), indent=2, default=str)))


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "-e", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--cwd", help="Working directory: absolute, or relative to the default one ('/' or the template's).")
@click.option("--user", "-u", help="Run as this guest user (name or uid).")
@click.option("--timeout", "timeout_seconds", type=float, default=None, help="Seconds; kills the process tree.")
@click.option("--max-output", "max_output_bytes", type=int, default=DEFAULT_MAX_OUTPUT_BYTES, show_default=True)
@click.option("--stdin", "use_stdin", is_flag=True, help="Pass this command's stdin to the process.")
@click.option("--receipt", "receipt", type=click.Path(dir_okay=False), help="Also write the signed receipt here.")
@json_option
def exec_(
    name: str,
    argv: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    timeout_seconds: float | None,
    max_output_bytes: int,
    use_stdin: bool,
    receipt: str | None,
    as_json: bool,
) -> None:
    """Run ARGV in sandbox NAME (after `--`); its exit status becomes ours."""
    sandbox = connect(name)
    stream = not as_json
    try:
        result = sandbox.commands.run(
            list(argv),
            env=parse_env(env),
            cwd=cwd,
            user=user,
            timeout_seconds=timeout_seconds,
            max_output_bytes=max_output_bytes,
            stdin=sys.stdin.buffer.read() if use_stdin else None,
            on_stdout=_echo_to(sys.stdout) if stream else None,
            on_stderr=_echo_to(sys.stderr) if stream else None,
        )
    except errors.CommandTimeout as exc:
        if as_json:
            click.echo(json.dumps({"error": exc.to_wire(), "stdout": exc.stdout, "stderr": exc.stderr}))
        else:
            click.echo(f"error: {exc}", err=True)
        sys.exit(124)
    if receipt and result.receipt_path:
        shutil.copyfile(result.receipt_path, receipt)
        os.chmod(receipt, 0o600)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif result.truncated:
        click.echo(f"mvmctl: output truncated at {max_output_bytes} bytes per stream", err=True)
    sys.exit(result.exit_code if result.exit_code is not None else 1)


def _echo_to(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


@click.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True)
@click.option("--tail", "-n", type=int, default=None, help="Only the last N lines.")
@json_option
def logs(name: str, follow: bool, tail: int | None, as_json: bool) -> None:
    """Print a sandbox's log (lifecycle, audit entries, process output)."""
    sandbox = connect(name)
    try:
        for event in sandbox.logs(follow=follow, tail=tail):
            if as_json:
                click.echo(json.dumps(event.to_dict()))
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(event.timestamp))
                click.echo(f"{stamp} {event.source:<14} {event.stream:<6} {event.message}")
    except KeyboardInterrupt:
        pass


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Destroy every running sandbox.")
@json_option
def down(names: tuple[str, ...], all_: bool, as_json: bool) -> None:
    """Destroy sandboxes (and their snapshots, unless kept)."""
    if not names and not all_:
        raise errors.InvalidArgument("NAME", "give sandbox names or --all")
    from ..sdk.sandbox import Sandbox

    targets = [i.id for i in Sandbox.list() if i.state != "lost"] if all_ else list(names)
    done = []
    for target in targets:
        connect(target).kill()
        done.append(target)
    emit(as_json, {"destroyed": done}, "\n".join(f"destroyed {t}" for t in done) or "nothing to destroy")


@click.command()
@json_option
def gc(as_json: bool) -> None:
    """Remove the sandboxes listed as "lost" (their supervisor died): leftover processes,
    mounts, cgroups, snapshot leftovers, their directories and names. Running ones stay."""
    from ..sdk.sandbox import gc as collect

    reaped = collect()
    emit(as_json, {"reaped": [i.to_dict() for i in reaped]},
         "\n".join(f"reaped {i.name} ({i.id})" for i in reaped) or "nothing to reap")
