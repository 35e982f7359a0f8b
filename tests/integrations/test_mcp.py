"""``mvmctl mcp`` driven by the mcp SDK's own ClientSession over stdio, on real sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

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

                sandbox_id = _payload(created)["id"]
                destroyed = await s.call_tool("destroy_sandbox", {"sandbox": name})
                assert not destroyed.is_error, destroyed

        # The sandbox's audit chain names the MCP client next to the server's own credentials.
        entries = [json.loads(line) for line in (mvm_home / "audit" / f"{sandbox_id}.jsonl").read_text().splitlines()]
        runs = [e for e in entries if e.get("op") == "exec.run"]
        assert runs, [e.get("op") for e in entries]
        principal = runs[0]["actor"]["on_behalf_of"]
        assert principal == {"via": "mcp", "transport": "stdio", "client": "judge-agent", "client_version": "7"}
        assert {"pid", "uid", "user"} <= set(runs[0]["actor"])

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
