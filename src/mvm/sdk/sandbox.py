"""``mvm.Sandbox``: create, connect to, use and end a sandbox."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..errors import kind_of, shown
from ..backends import backend_names
from ..durations import parse_duration
from ..protocol.requests import AGENT_USER, check_user
from ..security.secrets import Redactor, SecretRef, resolve_secret
from ..spec import (
    DEFAULT_TEMPLATE,
    DEFAULT_TTL,
    NetworkPolicy,
    Resources,
    SandboxConfig,
    default_name,
    validate_env_names,
    validate_name,
    validate_on_behalf_of,
    validate_snapshot_ref,
    validate_tags,
    validate_workload_id,
)
from ..supervisor.client import SupervisorClient
from ..supervisor.launch import launch
from ..supervisor.state import CONTROL_SOCKET, find_sandbox, list_sandboxes
from ..supervisor.state import gc as collect_lost
from ..templates import available_templates
from ..templates.catalog import check_template
from .commands import Commands
from .files import Files
from .includes import collect_includes
from ..snapshots.model import Snapshot
from .models import LogEvent, SandboxInfo
from .network import Network, Ports
from .transport import Transport

if TYPE_CHECKING:
    from ..cluster import Cluster

MODES = ("record", "plan", "live")


def current_mode(explicit: str | None = None) -> str:
    """``mode=`` wins, else ``$MVM_MODE`` (set by ``mvmctl``), else live."""
    mode = explicit or os.environ.get("MVM_MODE") or "live"
    if mode not in MODES:
        raise errors.InvalidArgument("mode", f"unknown mode {shown(mode)}", allowed=list(MODES))
    return mode


class Sandbox:
    """A live sandbox: a microVM or a namespace jail with an agent inside.

    >>> import mvm
    >>> with mvm.Sandbox.create("python-3.13", ttl="30m") as sandbox:
    ...     sandbox.files.write("/app/main.py", "print('hello from mvm')")
    ...     print(sandbox.commands.run(["python", "/app/main.py"]).stdout)
    hello from mvm
    """

    def __init__(
        self,
        sandbox_id: str,
        name: str,
        directory: Path,
        *,
        secret_values: dict[str, str] | None = None,
        connect: Callable[[], Transport] | None = None,
        mode: str = "live",
    ):
        self.id = sandbox_id
        self.name = name
        self.mode = mode
        self._directory = directory
        # How to reach the supervisor: its local socket, (mvm.cluster) a relay to its node,
        # or (record/plan mode) the recording.
        self._connect = connect or (lambda: SupervisorClient(directory / CONTROL_SOCKET))
        self._conn: Transport | None = None
        self._secret_values = dict(secret_values or {})  # secret name -> value, for redaction only
        self._killed = False
        self.commands = Commands(self)
        self.files = Files(self)
        self.ports = Ports(self)
        self.network = Network(self)

    def __repr__(self) -> str:
        return f"<Sandbox {self.name} ({self.id})>"

    # ---- creation and discovery ----------------------------------------------

    @classmethod
    def create(
        cls,
        template: str = DEFAULT_TEMPLATE,
        *,
        name: str | None = None,
        workload_id: str | None = None,
        ttl: str | int | float | None = DEFAULT_TTL,
        include: Sequence[str] | None = None,
        resources: Resources | None = None,
        network: NetworkPolicy | None = None,
        env: Mapping[str, str | SecretRef] | None = None,
        backend: str | None = None,
        mode: str | None = None,
        tags: Mapping[str, str] | None = None,
        from_snapshot: str | None = None,
        cluster: Cluster | None = None,
        on_behalf_of: Mapping[str, str] | None = None,
        auto_pause: str | int | float | None = None,
    ) -> Sandbox:
        """Create a sandbox from ``template`` and return once its agent answered.

        ``ttl`` ("30m", "2h", seconds; ``None`` = no expiry) destroys it even if this
        process dies. ``include`` copies host paths (relative to the script's folder)
        into ``/app``. ``env`` values may be ``mvm.secret(name)`` references.
        ``backend`` is ``"vm"`` or ``"namespace"`` (default: ``$MVM_BACKEND``, else the
        strongest this host can run). ``from_snapshot`` starts from a snapshot (id or
        name) and takes its sandbox's ``resources`` unless others are given (a VM's
        memory image then refuses a different cpu or memory). ``cluster``
        (``mvm.connect_cluster(...)``) places it on a node of a Ray cluster; the handle
        is the same class. ``on_behalf_of`` names who this program acts for (an MCP
        server names its client): the sandbox's audit chain records it with the creation
        and with every request of this handle, next to this process's own credentials.
        ``auto_pause`` ("5m", seconds; default ``None`` = never) pauses the sandbox once
        it was idle that long and resumes it on the next request, state intact (what
        counts as idle: ``mvm/supervisor/idle.py``, README). Both hold in every path: a
        ``cluster`` node creates with them, record/plan mode writes them into the workload
        IR (``mvmctl up --from-ir`` creates with them again).
        """
        resolved_mode = current_mode(mode)
        if cluster is not None and resolved_mode == "live":  # record/plan record it like any other
            sandbox: Sandbox = cluster.create(
                template, name=name, workload_id=workload_id, ttl=ttl, include=include, resources=resources,
                network=network, env=env, backend=backend, mode="live", tags=tags, from_snapshot=from_snapshot,
                on_behalf_of=on_behalf_of, auto_pause=auto_pause,
            )
            return sandbox
        request = create_request(
            template, name=name, workload_id=workload_id, ttl=ttl, include=include, resources=resources,
            network=network, env=env, backend=backend, tags=tags, from_snapshot=from_snapshot,
            on_behalf_of=on_behalf_of, auto_pause=auto_pause, live=resolved_mode == "live",
        )
        if resolved_mode != "live":
            return cls._recorded_by(resolved_mode, request)
        literal_env, secret_env, secret_values = _split_env(request.env)
        launched = launch(SandboxConfig(
            id="",  # the launch path picks id, default name and backend
            name=request.name or "",
            template=template,
            backend=request.backend or "",
            resources=request.resources,
            network=request.network,
            ttl_seconds=request.ttl_seconds,
            auto_pause_seconds=request.auto_pause_seconds,
            env=literal_env,
            secret_env_names=_secret_names(request.env),
            workload_id=workload_id,
            tags=dict(request.tags),
            created_at=time.time(),
            from_snapshot=from_snapshot,
            run_id=os.environ.get("MVM_RUN_ID"),
            on_behalf_of=request.on_behalf_of,
        ), secret_env)
        directory = launched.directory
        principal = request.on_behalf_of
        sandbox = cls(launched.config.id, launched.config.name, directory, secret_values=secret_values,
                      connect=lambda: SupervisorClient(directory / CONTROL_SOCKET, on_behalf_of=principal))
        sandbox._conn = launched.client  # a claimed pool member's connection, already open
        try:
            for guest_path, data, mode_bits in request.files:
                sandbox.files.write(guest_path, data, mode=mode_bits, user=AGENT_USER)  # root's, as a COPY
        except BaseException:
            sandbox.kill()
            raise
        return sandbox

    @classmethod
    def _recorded_by(cls, mode: str, request: CreateRequest) -> Sandbox:
        """Record/plan mode: ``request`` recorded as a ``sandbox.create``, and the handle
        that records every further call (a :class:`~mvm.modes.recording.RecordTransport`)."""
        from ..modes.recording import RecordTransport

        transport = RecordTransport.open(mode, request, lambda fallback: default_name(request.workload_id, fallback))
        return cls(transport.sandbox_id, transport.name, Path(), connect=lambda: transport, mode=mode)

    @property
    def recorded(self) -> bool:
        """True in record/plan mode: calls are recorded, nothing runs."""
        return self.mode != "live"

    @classmethod
    def connect(cls, name_or_id: str, *, cluster: Cluster | None = None) -> Sandbox:
        """Attach to a running sandbox (created by any process) by name or id
        (on any node of ``cluster`` when given). ``SandboxLost`` if its supervisor died."""
        if cluster is not None:
            found: Sandbox = cluster.connect(name_or_id)
            return found
        live_only("Sandbox.connect", "a recording can only describe sandboxes the script creates "
                  "(connect to a running one in live mode)")
        directory, record = find_sandbox(name_or_id)
        return cls(record["id"], record["name"], directory)

    @classmethod
    def list(cls, *, cluster: Cluster | None = None) -> list[SandboxInfo]:
        """Every sandbox on this host, or on every node of ``cluster``. One whose
        supervisor died (or whose node died) has state ``lost`` until ``mvm.gc()``
        removes it. Reads the sandboxes' on-disk records: connects to none."""
        if cluster is not None:
            return cluster.list()
        live_only("Sandbox.list", "list running sandboxes with `mvmctl ls`")
        return [SandboxInfo.from_record(record) for record in list_sandboxes()]

    # ---- plumbing ----------------------------------------------------------------

    def _client(self) -> Transport:
        if self._killed:
            raise errors.InvalidState(f"sandbox {self.name} was destroyed", state="destroyed")
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _redactor(self, text: str) -> str:
        """Mask the secret values this handle resolved (the supervisor already masks the
        ones it knows; this covers text that never went through it)."""
        return Redactor(self._secret_values).redact(text) if self._secret_values else text

    def _command_args(
        self, argv: Sequence[str] | str, env: Mapping[str, Any] | None, cwd: str | None, user: str | None = None
    ) -> dict[str, Any]:
        return command_args(argv, env, cwd, user, None if self.recorded else self._secret_values)

    # ---- information ---------------------------------------------------------------

    def describe(self) -> SandboxInfo:
        """Identity, state, limits, policy and isolation facts (``isolation`` is ``vm``
        or ``namespace``; ``details`` holds the backend's specifics)."""
        result, _ = self._client().call("sandbox.describe")
        return SandboxInfo.from_wire(result)

    @property
    def state(self) -> str:
        return self.describe().state

    def logs(
        self,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        redact: bool = True,
        idle_timeout: float | None = None,
    ) -> Iterator[LogEvent]:
        """The sandbox's log: lifecycle events, audit entries and process output lines.

        Known secret values never reach the log (the supervisor redacts them before
        writing); ``redact`` additionally masks values this handle resolved.
        ``idle_timeout`` raises ``StreamIdle`` when nothing was logged for that long.

        >>> for event in sandbox.logs(follow=False):
        ...     print(event.source, event.message)
        """
        frames = self._client().stream("sandbox.logs", {"follow": follow, "tail": tail, "since": since},
                                       idle_timeout=idle_timeout)
        return (log_event(data, self._redactor if redact else None) for _, data in frames)  # requested now:
        # record mode refuses at the call, not at the first next()

    # ---- lifecycle --------------------------------------------------------------------

    def stop(self) -> SandboxInfo:
        """Halt every process but keep the disk; ``start()`` runs it again."""
        return SandboxInfo.from_wire(self._client().call("sandbox.stop")[0])

    def start(self) -> SandboxInfo:
        return SandboxInfo.from_wire(self._client().call("sandbox.start")[0])

    def pause(self) -> SandboxInfo:
        """Freeze all execution (the VM stops; namespaces use the cgroup freezer)."""
        return SandboxInfo.from_wire(self._client().call("sandbox.pause")[0])

    def resume(self, snapshot: str | Snapshot | None = None) -> SandboxInfo:
        """Continue after ``pause()``, or replace the sandbox's state with ``snapshot``."""
        return SandboxInfo.from_wire(self._client().call("sandbox.resume", resume_args(snapshot))[0])

    def snapshot(self, name: str | None = None, *, expires: str | int | None = None, keep: bool = False) -> Snapshot:
        """Save the sandbox's state (memory+disk on a VM: ``kind="full"``; the writable
        filesystem on namespaces: ``kind="filesystem"``), sealed at rest.

        >>> snap = sandbox.snapshot(name="after-index", expires="24h")
        """
        args = snapshot_args(name, expires, keep)  # bad input is refused before connecting
        result, _ = self._client().call("sandbox.snapshot", args)
        return Snapshot.from_wire(result)

    def destroy(self) -> None:
        """Remove the sandbox and everything it made (its snapshots too, unless kept)."""
        if self._killed:
            return
        try:
            self._client().call("sandbox.destroy", timeout=120)
        except (errors.SandboxError, errors.SandboxNotFound):
            pass  # already gone: the supervisor exits right after answering
        finally:
            self._killed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def kill(self) -> None:
        """Stop and destroy; safe to call twice. The context manager calls it."""
        self.destroy()

    def close(self) -> None:
        """Drop this handle's connection without touching the sandbox."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def gc() -> list[SandboxInfo]:
    """Remove every ``lost`` sandbox of this host (its supervisor died): leftover guest
    processes, mounts, cgroups, snapshot-store leftovers, its directory and name. Returns
    what was removed (``mvmctl gc`` calls it). Sandboxes that run are never touched."""
    live_only("mvm.gc", "clean up lost sandboxes with `mvmctl gc`")
    return [SandboxInfo.from_record(record) for record in collect_lost()]


# ---- helpers -----------------------------------------------------------------------------


def script_dir() -> Path:
    """The folder of the running script (``include`` paths are relative to it), else the cwd."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path and not os.environ.get("MVM_INCLUDE_BASE"):
        return Path(path).resolve().parent
    return Path(os.environ.get("MVM_INCLUDE_BASE") or os.getcwd()).resolve()


def validate_command(
    argv: Sequence[str] | str, env: Mapping[str, Any] | None, cwd: str | None
) -> tuple[list[str], dict[str, Any]]:
    """Check a command's argv, env and cwd; shared by live and recorded sandboxes.

    A string argv becomes ``["/bin/sh", "-c", argv]``. Returns ``(argv, env)``;
    env values stay ``str`` or ``SecretRef`` (nothing is resolved here).
    """
    if isinstance(argv, str):
        argv = ["/bin/sh", "-c", argv]
    try:
        argv = list(argv)
    except TypeError:
        argv = []
    if not argv or not all(isinstance(a, str) for a in argv):
        raise errors.InvalidArgument(
            "argv",
            "must be a non-empty list of strings (or one shell string)",
            allowed="e.g. ['python', '/app/main.py']",
        )
    if cwd is not None and (not isinstance(cwd, str) or not cwd or "\0" in cwd):
        raise errors.InvalidArgument(
            "cwd",
            f"{shown(cwd)} is not a guest directory",
            allowed="an absolute path, or one relative to the default working directory",
        )
    env = dict(env or {})
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise errors.InvalidArgument("env", f"{shown(key)} is not a valid variable name")
        if not isinstance(value, (str, SecretRef)):
            raise errors.InvalidArgument(
                f"env[{shown(key)}]", f"{kind_of(value)} value", allowed="a string or secret(name)"
            )
    return argv, env


def command_args(
    argv: Sequence[str] | str,
    env: Mapping[str, Any] | None,
    cwd: str | None,
    user: str | None,
    secret_values: dict[str, str] | None,
) -> dict[str, Any]:
    """The command part of ``exec.run``/``proc.start`` arguments (checked, secrets resolved;
    their values are added to ``secret_values`` for redaction). Shared by ``AsyncSandbox``.
    ``secret_values=None`` (record/plan mode): secrets are not resolved; ``env`` holds the
    literals and ``secret_names`` names the rest."""
    argv, env = validate_command(argv, env, cwd)
    check_user(user)
    secret_env: dict[str, str] = {}
    if secret_values is None:
        literal = {k: v for k, v in env.items() if isinstance(v, str)}
    else:
        literal, secret_env, values = _split_env(env)
        secret_values.update(values)
    args = {"argv": argv, "env": {**literal, **secret_env}, "cwd": cwd, "secret_names": _secret_names(env or {})}
    if user is not None:
        args["user"] = user
    return args


def log_event(data: bytes, redactor: Callable[[str], str] | None) -> LogEvent:
    """One ``sandbox.logs`` data frame as a ``LogEvent``, its message masked by ``redactor``."""
    event = LogEvent.from_wire(json.loads(data))
    if redactor is None:
        return event
    return LogEvent(event.timestamp, event.source, event.stream, redactor(event.message), event.audit_id)


def resume_args(snapshot: str | Snapshot | None) -> dict[str, Any]:
    return {"snapshot": snapshot.id if isinstance(snapshot, Snapshot) else snapshot}


def snapshot_args(name: str | None, expires: str | int | None, keep: bool) -> dict[str, Any]:
    if expires is not None:
        parse_duration(expires, field="expires")
    return {"name": name, "expires": expires, "keep": keep}


def snapshot_shape(snapshot: Any) -> Resources:
    """The resources a sandbox created ``from_snapshot=snapshot`` gets when its creator
    names none: those of the sandbox the snapshot was taken from."""
    if not isinstance(snapshot, str) or not snapshot.strip():
        raise errors.InvalidArgument("from_snapshot", f"{shown(snapshot)} must be a snapshot id or name")
    from ..snapshots import SnapshotStore
    from ..snapshots import shape

    return shape(SnapshotStore(), snapshot)


@dataclass(frozen=True)
class CreateRequest:
    """``Sandbox.create``'s arguments, checked once (:func:`create_request`): the live path
    turns them into a ``SandboxConfig``, record/plan mode into a ``sandbox.create`` event."""

    template: str
    name: str | None
    workload_id: str | None
    backend: str | None  # as asked; the live path resolves None to the strongest available
    resources: Resources
    network: NetworkPolicy
    ttl_seconds: int | None
    env: Mapping[str, str | SecretRef]
    tags: Mapping[str, str]
    from_snapshot: str | None
    include: Sequence[str]  # as given, relative to the script's folder
    files: list[tuple[str, bytes, int]]  # (guest path, bytes, mode) of every included file
    auto_pause_seconds: int | None = None
    on_behalf_of: dict[str, str] | None = None  # audited with the creation and every request


def create_request(
    template: str,
    *,
    name: str | None,
    workload_id: str | None,
    ttl: Any,
    include: Sequence[str] | None,
    resources: Resources | None,
    network: NetworkPolicy | None,
    env: Mapping[str, Any] | None,
    backend: str | None,
    tags: Mapping[str, str] | None,
    from_snapshot: str | None,
    on_behalf_of: Mapping[str, str] | None = None,
    auto_pause: str | int | float | None = None,
    live: bool,
) -> CreateRequest:
    """Check ``Sandbox.create``'s arguments, in one order for every mode. Live, a restore
    takes the snapshot's shape unless ``resources`` are given; record/plan mode never
    builds a template nor reads the snapshot store."""
    auto_pause_seconds = None if auto_pause is None else parse_duration(auto_pause, field="auto_pause")
    principal = validate_on_behalf_of(on_behalf_of)
    if live and from_snapshot is not None and resources is None:
        resources = snapshot_shape(from_snapshot)
    spec = validated_spec(template, name=name, workload_id=workload_id, ttl=ttl, resources=resources,
                           network=network, env=env, tags=tags)
    files = collect_includes(include or [], base_dir=script_dir())
    if not live:  # live, choose_backend checks it against what this host can run
        if backend is not None and backend not in backend_names():
            raise errors.InvalidArgument("backend", f"unknown backend {shown(backend)}", allowed=backend_names())
        validate_snapshot_ref(from_snapshot)
    return CreateRequest(
        template=template, name=name, workload_id=workload_id, backend=backend, resources=spec["resources"],
        network=spec["network"], ttl_seconds=spec["ttl_seconds"], env=dict(env or {}), tags=dict(tags or {}),
        from_snapshot=from_snapshot, include=list(include or []), files=files,
        auto_pause_seconds=auto_pause_seconds, on_behalf_of=principal,
    )


def live_only(call: str, hint: str) -> None:
    """``connect``/``list`` find running sandboxes: a recording has none."""
    mode = current_mode()
    if mode != "live":
        from ..modes.recording import not_available

        not_available(call, mode, hint)


def validated_spec(
    template: str,
    *,
    name: str | None,
    workload_id: str | None,
    ttl: Any,
    resources: Resources | None,
    network: NetworkPolicy | None,
    env: Mapping[str, Any] | None,
    tags: Mapping[str, str] | None,
) -> dict[str, Any]:
    """Validate ``Sandbox.create``'s arguments (live and record/plan modes alike).

    A name not in ``available_templates()`` is checked without building
    (``check_template``): the live create builds the template once afterwards, in the
    launch path, so validation never builds it a second time.
    """
    if not isinstance(template, str) or template not in available_templates():
        check_template(template)  # raises TemplateNotFound with the buildable names
    if name is not None:
        validate_name(name)
    validate_workload_id(workload_id)
    if resources is not None and not isinstance(resources, Resources):
        raise errors.InvalidArgument("resources", "use mvm.resources(...)", allowed="mvm.resources(cpu_cores=..., ...)")
    if network is not None and not isinstance(network, NetworkPolicy):
        raise errors.InvalidArgument(
            "network", "use mvm.network(...)", allowed="mvm.network(mode='deny'|'allow'|'open')"
        )
    validate_env_names(env or {})
    for key, value in (env or {}).items():
        if not isinstance(value, (str, SecretRef)):
            raise errors.InvalidArgument(
                f"env[{shown(key)}]", f"{kind_of(value)} value", allowed="a string or secret(name)"
            )
    validate_tags(tags or {})
    ttl_seconds = None if ttl is None else parse_duration(ttl, field="ttl")
    return {
        "name": name,
        "resources": resources or Resources(),
        "network": network or NetworkPolicy(),
        "ttl_seconds": ttl_seconds,
    }


def _split_env(env: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(literal env, env key -> secret value, secret name -> value)."""
    literal: dict[str, str] = {}
    secret_env: dict[str, str] = {}
    values: dict[str, str] = {}
    for key, value in env.items():
        if isinstance(value, SecretRef):
            resolved = resolve_secret(value.name)
            secret_env[key] = resolved
            values[value.name] = resolved
        elif isinstance(value, str):
            literal[key] = value
        else:
            raise errors.InvalidArgument(
                f"env[{shown(key)}]", f"{kind_of(value)} value", allowed="a string or secret(name)"
            )
    return literal, secret_env, values


def _secret_names(env: Mapping[str, Any]) -> dict[str, str]:
    return {k: v.name for k, v in env.items() if isinstance(v, SecretRef)}
