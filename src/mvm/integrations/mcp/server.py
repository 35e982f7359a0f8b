"""``mvmctl mcp``: mvm sandboxes as tools of a Model Context Protocol server
(``pip install 'mvm[mcp]'``; the official ``mcp`` SDK).

The operator's policy bounds what the model may ask for: at most ``max_sandboxes`` live
sandboxes of this server, only the listed templates, and a network no wider than the
operator's allow-list. A request beyond it is a tool error naming the limit. The model
only reaches sandboxes this server created. Every request to a sandbox carries the MCP
client's identity (``on_behalf_of``), which the sandbox's audit chain records next to
this process's own credentials. Secrets are passed as names (``mvm.secret``), never values.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets as _secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

from ... import errors
from ...sdk.async_sandbox import AsyncSandbox
from ...sdk.commands import signal_args
from ...sdk.policy import network as make_network
from ...sdk.policy import resources as make_resources
from ...sdk.policy import secret
from ...spec import DEFAULT_TEMPLATE, DEFAULT_TTL, Resources

#: Largest file ``read_file`` returns to the model.
MAX_READ_BYTES = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class OperatorPolicy:
    """What ``mvmctl mcp`` lets the model do (flags ``--max-sandboxes``, ``--template``, ``--network``)."""

    max_sandboxes: int = 4
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    network_allow: tuple[str, ...] = ()  # empty: deny
    backend: str | None = None

    @classmethod
    def parse(cls, max_sandboxes: int, templates: tuple[str, ...], network: str, backend: str | None) -> OperatorPolicy:
        if max_sandboxes < 1:
            raise errors.InvalidArgument("--max-sandboxes", f"{max_sandboxes} must be at least 1")
        if network == "deny":
            allow: tuple[str, ...] = ()
        elif network.startswith("allow:"):
            allow = tuple(e.strip() for e in network.removeprefix("allow:").split(",") if e.strip())
            make_network("allow", allow)  # validated like any policy
        else:
            raise errors.InvalidArgument("--network", f"{network!r}", allowed="deny | allow:HOST:PORT,HOST:PORT...")
        return cls(max_sandboxes, templates or cls.templates, allow, backend)


@dataclass
class SandboxRegistry:
    """The sandboxes this server created (the only ones the model can reach)."""

    policy: OperatorPolicy
    sandboxes: dict[str, AsyncSandbox] = field(default_factory=dict)
    creating: int = 0

    def get(self, name: str) -> AsyncSandbox:
        sandbox = self.sandboxes.get(name)
        if sandbox is None:
            raise ToolError(f"no sandbox {name!r} from this server; known: {sorted(self.sandboxes) or 'none'}")
        return sandbox


def client_identity(ctx: Context[Any, Any], transport: str) -> dict[str, str]:
    """The MCP client as its ``initialize`` named itself, and the transport it came through."""
    identity = {"via": "mcp", "transport": transport}
    params = ctx.session.client_params
    info = getattr(params, "client_info", None) or getattr(params, "clientInfo", None)
    if info is not None:
        identity["client"] = str(getattr(info, "name", "?"))
        identity["client_version"] = str(getattr(info, "version", "?"))
    return identity


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """mvm's typed errors become tool errors the model can read (any other exception
    would reach the client as a bare "Error executing tool")."""
    try:
        yield
    except errors.MvmError as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from None


async def _tool_call(action: Awaitable[T]) -> T:
    with tool_errors():
        return await action


def build_server(policy: OperatorPolicy, *, transport: str = "stdio") -> tuple[MCPServer, SandboxRegistry]:
    registry = SandboxRegistry(policy)
    server = MCPServer(
        "mvm",
        instructions=(
            "Disposable sandboxes for running untrusted code. Create one, run commands, read and "
            f"write files, destroy it when done. Templates: {', '.join(policy.templates)}; at most "
            f"{policy.max_sandboxes} at once; network: "
            f"{'allow ' + ', '.join(policy.network_allow) if policy.network_allow else 'none'}."
        ),
    )

    def tool(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        server.tool()(fn)
        return fn

    @tool
    async def create_sandbox(
        ctx: Context[Any, Any],
        template: str = policy.templates[0],
        ttl: str = DEFAULT_TTL,
        cpu_cores: int = int(Resources.cpu_cores),
        memory_mb: int = Resources.memory_mb,
        network_allow: list[str] | None = None,
        secret_env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create a sandbox. ``network_allow``: host:port entries, a subset of the operator's
        allow-list (empty: no network). ``secret_env``: variable -> secret name (values stay
        on the host)."""
        if template not in policy.templates:
            raise ToolError(f"template {template!r} is not allowed by the operator; allowed: {list(policy.templates)}")
        wanted = list(network_allow or [])
        beyond = [entry for entry in wanted if entry not in policy.network_allow]
        if beyond:
            raise ToolError(
                f"network entries {beyond} are outside the operator's allow-list {list(policy.network_allow)}"
            )
        if len(registry.sandboxes) + registry.creating >= policy.max_sandboxes:
            raise ToolError(f"the operator allows at most {policy.max_sandboxes} sandboxes; destroy one first")
        registry.creating += 1
        try:
            with tool_errors():
                sandbox = await AsyncSandbox.create(
                    template,
                    ttl=ttl,
                    resources=make_resources(cpu_cores=cpu_cores, memory_mb=memory_mb),
                    network=make_network("allow", wanted) if wanted else make_network("deny"),
                    env={k: secret(v) for k, v in (secret_env or {}).items()},
                    backend=policy.backend,
                    tags={"mcp": "true"},
                    on_behalf_of=client_identity(ctx, transport),
                )
        finally:
            registry.creating -= 1
        registry.sandboxes[sandbox.name] = sandbox
        return {"sandbox": sandbox.name, "id": sandbox.id}

    @tool
    async def run_command(
        sandbox: str, argv: list[str] | None = None, command: str | None = None, timeout_seconds: float = 60
    ) -> dict[str, Any]:
        """Run a command to completion: ``argv`` (a list) or ``command`` (a shell string)."""
        if (argv is None) == (command is None):
            raise ToolError("give exactly one of argv (a list of strings) or command (a shell string)")
        target = argv if argv is not None else command
        assert target is not None
        result = await _tool_call(registry.get(sandbox).commands.run(target, timeout_seconds=timeout_seconds))
        return {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                "truncated": result.truncated, "audit_id": result.audit_id}

    @tool
    async def start_process(sandbox: str, argv: list[str]) -> dict[str, Any]:
        """Start a long-running process; returns its pid."""
        process = await _tool_call(registry.get(sandbox).commands.start(argv))
        return {"pid": process.pid, "audit_id": process.audit_id}

    @tool
    async def stop_process(sandbox: str, pid: int, signal: str = "TERM") -> dict[str, Any]:
        """Signal a process (TERM, KILL, INT or HUP) and its group."""
        target = registry.get(sandbox)
        with tool_errors():
            signal_args({"pid": pid}, signal, True)  # a bad signal is refused before the sandbox is asked
        process = await _tool_call(target.commands.connect(pid))
        await _tool_call(process.signal(signal))
        return {"pid": pid, "signal": signal}

    @tool
    async def read_file(sandbox: str, path: str) -> str:
        """A file's text (at most 1 MiB)."""
        return await _tool_call(registry.get(sandbox).files.read_text(path, max_bytes=MAX_READ_BYTES))

    @tool
    async def write_file(sandbox: str, path: str, content: str) -> dict[str, Any]:
        """Write text to a file (parents created)."""
        entry = await _tool_call(registry.get(sandbox).files.write(path, content))
        return {"path": entry.path, "size": entry.size}

    @tool
    async def list_files(sandbox: str, path: str = "/") -> list[dict[str, Any]]:
        """Entries of a directory."""
        entries = await _tool_call(registry.get(sandbox).files.list(path))
        return [{"name": e.name, "type": e.type, "size": e.size} for e in entries]

    @tool
    async def forward_port(sandbox: str, guest_port: int) -> dict[str, Any]:
        """Relay a free 127.0.0.1 port of the host to the guest's port."""
        forward = await _tool_call(registry.get(sandbox).ports.forward(guest_port=guest_port))
        return {"address": forward.address, "host_port": forward.host_port, "guest_port": guest_port}

    @tool
    async def snapshot_sandbox(sandbox: str, name: str | None = None) -> dict[str, Any]:
        """Save the sandbox's state; returns the snapshot id for restore_sandbox."""
        snap = await _tool_call(registry.get(sandbox).snapshot(name))
        return {"snapshot": snap.id, "kind": snap.kind}

    @tool
    async def restore_sandbox(sandbox: str, snapshot: str) -> dict[str, Any]:
        """Replace the sandbox's state with a snapshot taken earlier."""
        info = await _tool_call(registry.get(sandbox).resume(snapshot))
        return {"sandbox": sandbox, "state": info.state}

    @tool
    async def destroy_sandbox(sandbox: str) -> dict[str, Any]:
        """Destroy a sandbox and everything in it."""
        target = registry.get(sandbox)
        await _tool_call(target.kill())
        registry.sandboxes.pop(sandbox, None)
        return {"sandbox": sandbox, "destroyed": True}

    return server, registry


async def _destroy_all(registry: SandboxRegistry) -> None:
    await asyncio.gather(*(s.kill() for s in registry.sandboxes.values()), return_exceptions=True)
    registry.sandboxes.clear()


def serve_stdio(policy: OperatorPolicy) -> None:
    """Serve over stdin/stdout until the client closes them; the sandboxes go with it."""
    server, registry = build_server(policy, transport="stdio")

    async def main() -> None:
        try:
            await server.run_stdio_async()
        finally:
            await _destroy_all(registry)

    asyncio.run(main())


def serve_http(policy: OperatorPolicy, *, port: int, token: str | None, announce: Callable[[str], None]) -> None:
    """Serve streamable HTTP on 127.0.0.1:``port`` (``/mcp``); every request needs
    ``Authorization: Bearer <token>`` (a fresh token is made and announced when none is given)."""
    import uvicorn
    from starlette.responses import PlainTextResponse
    from starlette.types import ASGIApp, Receive, Scope, Send

    token = token or _secrets.token_urlsafe(32)
    server, registry = build_server(policy, transport="http")
    app = server.streamable_http_app(host="127.0.0.1")
    expected = f"Bearer {token}".encode()

    class BearerToken:
        def __init__(self, inner: ASGIApp):
            self.inner = inner

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                given = dict(scope.get("headers") or []).get(b"authorization", b"")
                if not _secrets.compare_digest(given, expected):
                    await PlainTextResponse("missing or wrong bearer token", status_code=401)(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    announce(f"mvm MCP server on http://127.0.0.1:{port}/mcp (Authorization: Bearer {token})")

    async def main() -> None:
        config = uvicorn.Config(BearerToken(app), host="127.0.0.1", port=port, log_level="warning")
        try:
            await uvicorn.Server(config).serve()
        finally:
            await _destroy_all(registry)

    asyncio.run(main())
