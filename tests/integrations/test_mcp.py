"""``mvmctl mcp`` driven by the mcp SDK's own ClientSession over stdio, on real sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import mvm
from mvm.backends import availability

mcp = pytest.importorskip("mcp")
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from mcp_types import Implementation  # noqa: E402

pytestmark = pytest.mark.skipif(not availability("namespace").ok, reason="namespace backend unavailable here")
MVMCTL = str(Path(sys.executable).with_name("mvmctl"))


def _payload(result: Any) -> Any:
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if isinstance(content, dict) and set(content) == {"result"} else content
    return json.loads(result.content[0].text)


def _error_text(result: Any) -> str:
    assert result.is_error, result
    return " ".join(getattr(block, "text", "") for block in result.content)


async def _call_ok(session: ClientSession, tool: str, arguments: dict[str, Any]) -> bool:
    return await _call_exit(session, tool, arguments, nonzero=False)


async def _call_exit(session: ClientSession, tool: str, arguments: dict[str, Any], *, nonzero: bool) -> bool:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result
    return (_payload(result)["exit_code"] != 0) == nonzero


async def _until(predicate: Any, what: str, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.1)


def _http_get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def test_stdio_server_tools_policy_and_audit(mvm_home: Path) -> None:
    params = StdioServerParameters(
        command=MVMCTL,
        args=["mcp", "--max-sandboxes", "1", "--template", "python-3.13", "--network", "deny",
              "--backend", "namespace"],
        env=dict(os.environ),
    )

    async def scenario() -> None:
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write, client_info=Implementation(name="judge-agent", version="7")) as s:
                await s.initialize()
                tools = {tool.name for tool in (await s.list_tools()).tools}
                assert {"create_sandbox", "run_command", "read_file", "write_file", "list_files", "start_process",
                        "stop_process", "forward_port", "snapshot_sandbox", "restore_sandbox",
                        "destroy_sandbox"} <= tools

                # Beyond the operator's policy: clear tool errors, nothing created.
                wider = await s.call_tool("create_sandbox", {"network_allow": ["pypi.org:443"]})
                assert "outside the operator's allow-list" in _error_text(wider)
                other = await s.call_tool("create_sandbox", {"template": "debian-12"})
                assert "not allowed by the operator" in _error_text(other)

                assert "ttl" in _error_text(await s.call_tool("create_sandbox", {"ttl": "forever"}))
                assert "memory_mb" in _error_text(await s.call_tool("create_sandbox", {"memory_mb": -1}))
                assert not await asyncio.to_thread(mvm.Sandbox.list)  # refused requests left nothing

                created = await s.call_tool("create_sandbox", {"ttl": "10m", "memory_mb": 256})
                assert not created.is_error, created
                name = _payload(created)["sandbox"]
                second = await s.call_tool("create_sandbox", {})
                assert "at most 1 sandboxes" in _error_text(second)

                wrote = await s.call_tool("write_file", {"sandbox": name, "path": "/app/hi.py",
                                                          "content": "print('hi from mcp')"})
                assert not wrote.is_error, wrote
                ran = _payload(await s.call_tool("run_command", {"sandbox": name, "argv": ["python", "/app/hi.py"]}))
                assert (ran["exit_code"], ran["stdout"]) == (0, "hi from mcp\n")
                text = await s.call_tool("read_file", {"sandbox": name, "path": "/app/hi.py"})
                assert _payload(text) == "print('hi from mcp')" or text.content[0].text == "print('hi from mcp')"
                listing = _payload(await s.call_tool("list_files", {"sandbox": name, "path": "/app"}))
                assert [entry["name"] for entry in listing] == ["hi.py"]

                # Bad arguments are tool errors, and the server keeps serving.
                assert "InvalidArgument" in _error_text(
                    await s.call_tool("run_command", {"sandbox": name, "argv": []})
                )
                assert "FileNotFound" in _error_text(
                    await s.call_tool("read_file", {"sandbox": name, "path": "/nope"})
                )
                unknown = await s.call_tool("run_command", {"sandbox": "x", "command": "true"})
                assert "no sandbox" in _error_text(unknown)
                assert (await s.call_tool("run_command", {"sandbox": name, "argv": "not a list"})).is_error

                # A guest server started as a process, reached through a forwarded port, then stopped.
                started = await s.call_tool("start_process", {"sandbox": name, "argv": [
                    "python", "-m", "http.server", "8124", "--bind", "127.0.0.1", "--directory", "/app"]})
                assert not started.is_error, started
                pid = _payload(started)["pid"]
                probe = {"sandbox": name, "argv": ["python", "-c",
                         "import socket; socket.create_connection(('127.0.0.1', 8124), 1)"]}
                await _until(lambda: _call_ok(s, "run_command", probe), "the guest HTTP server to listen")
                forward = await s.call_tool("forward_port", {"sandbox": name, "guest_port": 8124})
                assert not forward.is_error, forward
                host_port = _payload(forward)["host_port"]
                page = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{host_port}/hi.py")
                assert page == b"print('hi from mcp')"
                stopped = await s.call_tool("stop_process", {"sandbox": name, "pid": pid, "signal": "KILL"})
                assert not stopped.is_error, stopped
                alive = {"sandbox": name, "command": f"kill -0 {pid} 2>/dev/null"}
                await _until(lambda: _call_exit(s, "run_command", alive, nonzero=True), "the process to stop")

                # Snapshot, change, restore: the change is gone.
                snap = await s.call_tool("snapshot_sandbox", {"sandbox": name, "name": "mcp-snap"})
                assert not snap.is_error, snap
                snapshot_id = _payload(snap)["snapshot"]
                await s.call_tool("write_file", {"sandbox": name, "path": "/app/hi.py", "content": "changed"})
                restored = await s.call_tool("restore_sandbox", {"sandbox": name, "snapshot": snapshot_id})
                assert not restored.is_error, restored
                assert _payload(restored)["state"] == "running"
                again = await s.call_tool("read_file", {"sandbox": name, "path": "/app/hi.py"})
                assert again.content[0].text == "print('hi from mcp')"

                # More bad arguments: tool errors naming the problem; the server keeps serving.
                bad_calls = {
                    ("forward_port", "guest_port"): {"sandbox": name, "guest_port": 0},
                    ("stop_process", "signal"): {"sandbox": name, "pid": pid, "signal": "BOGUS"},
                    ("restore_sandbox", "snapshot"): {"sandbox": name, "snapshot": "no-such-snapshot"},
                    ("snapshot_sandbox", "sandbox"): {"sandbox": "nope"},
                    ("list_files", "path"): {"sandbox": name, "path": "relative"},
                    ("write_file", "path"): {"sandbox": name, "path": "relative", "content": "x"},
                    ("start_process", "argv"): {"sandbox": name, "argv": []},
                    ("forward_port", "type"): {"sandbox": name, "guest_port": "eighty"},
                }
                for (tool, what), arguments in bad_calls.items():
                    refused = await s.call_tool(tool, arguments)
                    assert refused.is_error, (tool, what, refused)
                    assert _error_text(refused), (tool, what)
                assert "signal" in _error_text(await s.call_tool("stop_process", bad_calls[("stop_process",
                                                                                              "signal")]))
                assert "guest_port" in _error_text(await s.call_tool("forward_port", bad_calls[("forward_port",
                                                                                                "guest_port")]))
                assert "SnapshotNotFound" in _error_text(
                    await s.call_tool("restore_sandbox", bad_calls[("restore_sandbox", "snapshot")])
                )
                alive_now = await s.call_tool("run_command", {"sandbox": name, "command": "echo alive"})
                assert not alive_now.is_error, _error_text(alive_now)
                still = _payload(alive_now)
                assert still["stdout"] == "alive\n"

                sandbox_id = _payload(created)["id"]
                destroyed = await s.call_tool("destroy_sandbox", {"sandbox": name})
                assert not destroyed.is_error, destroyed

        # Every tool call is in the sandbox's audit chain, naming the MCP client next to the
        # server's own credentials.
        entries = [json.loads(line) for line in (mvm_home / "audit" / f"{sandbox_id}.jsonl").read_text().splitlines()]
        client = {"via": "mcp", "transport": "stdio", "client": "judge-agent", "client_version": "7"}
        by_op: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            by_op.setdefault(entry.get("op", ""), []).append(entry)
        tool_ops = ["sandbox.create", "exec.run", "fs.write", "fs.read", "fs.list", "proc.start", "port.forward",
                    "proc.signal", "snapshot.save", "sandbox.resume", "snapshot.restore", "sandbox.destroy"]
        for op in tool_ops:
            assert op in by_op, (op, sorted(by_op))
            for entry in by_op[op]:
                assert entry["actor"]["on_behalf_of"] == client, entry
                assert {"pid", "uid", "user"} <= set(entry["actor"]), entry

    asyncio.run(scenario())


def test_streamable_http_needs_the_bearer_token(mvm_home: Path) -> None:
    import socket
    import subprocess
    import urllib.error
    import urllib.request

    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from waiting import wait_for

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = "t0ken-for-this-test"
    server = subprocess.Popen([MVMCTL, "mcp", "--http", str(port), "--token", token, "--backend", "namespace"],
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/mcp"

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, "the MCP HTTP server to listen")
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json", **headers})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401

        async def scenario() -> None:
            client = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
            async with client, streamable_http_client(url, http_client=client) as (read, write):
                async with ClientSession(read, write, client_info=Implementation(name="http-agent", version="1")) as s:
                    await s.initialize()
                    assert "run_command" in {tool.name for tool in (await s.list_tools()).tools}
                    created = _payload(await s.call_tool("create_sandbox", {"ttl": "10m", "memory_mb": 256}))
                    name = created["sandbox"]
                    ran = _payload(await s.call_tool("run_command", {"sandbox": name, "command": "echo ok"}))
                    assert ran["stdout"] == "ok\n"
                    assert not (await s.call_tool("destroy_sandbox", {"sandbox": name})).is_error

        asyncio.run(scenario())
    finally:
        server.terminate()
        server.wait(timeout=60)
