"""Result types shared by the SDK, the CLI and (field for field) the TypeScript SDK."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class CommandResult:
    """What ``commands.run`` returns.

    ``exit_code`` is ``None`` only for a recorded (record/plan mode) result, never
    an invented value. ``truncated`` says output capture hit ``max_output_bytes``.
    """

    exit_code: int | None
    stdout: str
    stderr: str
    audit_id: str | None
    duration_seconds: float
    truncated: bool = False
    signal: int | None = None
    pid: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    receipt_path: str | None = None
    recorded: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FileEntry:
    """One entry of ``files.list`` / ``files.stat``."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float
    symlink_target: str | None = None

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> FileEntry:
        return cls(
            name=raw["name"],
            path=raw["path"],
            type=raw["type"],
            size=int(raw.get("size", 0)),
            mode=int(raw.get("mode", 0)),
            mtime=float(raw.get("mtime", 0.0)),
            symlink_target=raw.get("symlink_target"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LogEvent:
    """One line of a sandbox's log: ``source`` is ``supervisor``, ``process:<pid>``,
    ``network`` …; ``stream`` is ``stdout``/``stderr``/``system``."""

    timestamp: float
    source: str
    stream: str
    message: str
    audit_id: str | None = None

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> LogEvent:
        return cls(
            timestamp=float(raw["timestamp"]),
            source=str(raw["source"]),
            stream=str(raw["stream"]),
            message=str(raw["message"]),
            audit_id=raw.get("audit_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    argv: list[str]
    running: bool
    exit_code: int | None
    started_at: float

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ProcessInfo:
        return cls(
            pid=int(raw["pid"]),
            argv=list(raw.get("argv", [])),
            running=bool(raw.get("running")),
            exit_code=raw.get("exit_code"),
            started_at=float(raw.get("started_at", 0.0)),
        )


@dataclass(frozen=True)
class SandboxInfo:
    """``describe()``: the sandbox's identity, state, policy and isolation facts. ``state`` is
    one of ``mvm.supervisor.state.STATES``; ``lost`` (in ``Sandbox.list()`` only) means its
    supervisor died, until ``mvm.gc()`` removes it."""

    id: str
    name: str
    state: str
    template: str
    backend: str
    isolation: str
    resources: dict[str, Any]
    network: dict[str, Any]
    created_at: float
    expires_at: float | None
    workload_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def pool(self) -> dict[str, Any] | None:
        """Set when a create claimed this sandbox from a warm pool (``mvm.pool``): ``{id,
        prestarted_at, claimed_at, prestart_audit_id}`` (TypeScript: ``SandboxInfo.pool``)."""
        membership = self.details.get("pool")
        return dict(membership) if isinstance(membership, dict) else None

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> SandboxInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_record(
        cls, record: dict[str, Any], *, state: str | None = None, details: dict[str, Any] | None = None
    ) -> SandboxInfo:
        """From a sandbox's on-disk record (``Sandbox.list``, the cluster's list): its isolation
        is the record's own (written at launch); a record older than that field asks the registry."""
        from ..backends import isolation_of

        return cls(
            id=record["id"],
            name=record["name"],
            state=state or record.get("state", "creating"),
            template=record["template"],
            backend=record["backend"],
            isolation=record.get("isolation") or isolation_of(record["backend"]),
            resources=record.get("resources", {}),
            network=record.get("network", {}),
            created_at=record.get("created_at", 0.0),
            expires_at=record.get("expires_at"),
            workload_id=record.get("workload_id"),
            details={"tags": record.get("tags", {}), "run_id": record.get("run_id"), **(details or {})},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PortForward:
    """A host listener relayed to a guest port (``sandbox.ports.forward``); ``close()`` it,
    or use it as a context manager. The counters are as of the call that returned it
    (``sandbox.ports.list()`` for fresh ones)."""

    host: str
    host_port: int
    guest_port: int
    id: str | None = None
    detached: bool = True
    connections: int = 0
    total_connections: int = 0
    failed_connections: int = 0
    bytes_in: int = 0  # host -> guest, of finished connections
    bytes_out: int = 0  # guest -> host
    audit_id: str | None = None
    _sandbox: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_wire(cls, raw: dict[str, Any], sandbox: Any = None) -> PortForward:
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        return cls(**{k: v for k, v in raw.items() if k in known}, _sandbox=sandbox)

    @property
    def address(self) -> str:
        """``host:port`` to connect to (``[::1]:port`` for IPv6)."""
        return f"[{self.host}]:{self.host_port}" if ":" in self.host else f"{self.host}:{self.host_port}"

    def close(self) -> None:
        """Stop listening and reset this forward's connections (a no-op once closed)."""
        if self._sandbox is None:
            raise RuntimeError("this PortForward is not bound to a sandbox")
        if inspect.iscoroutinefunction(self._sandbox.ports.close):
            raise TypeError("this forward belongs to an AsyncSandbox: await fwd.aclose()")
        with _closing_forward():
            self._sandbox.ports.close(self)

    async def aclose(self) -> None:
        """``close()`` for a forward of an ``AsyncSandbox``."""
        if self._sandbox is None:
            raise RuntimeError("this PortForward is not bound to a sandbox")
        with _closing_forward():
            await self._sandbox.ports.close(self)

    def __enter__(self) -> PortForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> PortForward:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if not f.startswith("_")}


@contextlib.contextmanager
def _closing_forward() -> Iterator[None]:
    """Closing a forward that is already closed, or whose sandbox is gone, is a no-op."""
    from .. import errors

    try:
        yield
    except errors.InvalidArgument:
        pass  # already closed
    except (errors.SandboxError, errors.SandboxNotFound, errors.InvalidState):
        pass  # the sandbox is gone, and its forwards with it
