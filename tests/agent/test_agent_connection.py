"""The agent's connection: hello, dispatch robustness, reconnects, shutdown, PID-1 and installed modes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_harness import (
    AgentClient,
    guest_pythons,
    installed_agent_command,
    pid_exists,
    unshare_available,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvm.protocol import codec
from mvm.protocol.channel import ChannelClosed, FramedChannel

ERROR_TYPES = {
    "InvalidArgument", "FileNotFound", "NotADirectory", "IsADirectory", "FileExists", "DirectoryNotEmpty",
    "PermissionDenied", "TooLarge", "ProcessNotFound", "CommandTimeout", "SandboxPaused", "InvalidState",
    "Cancelled", "UnknownOp", "Internal",
}


def _recv_until_closed(channel: FramedChannel, timeout: float = 5.0) -> list[codec.Frame]:
    """Frames received until the agent closes the connection (fails if it does not)."""
    frames = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frames.append(channel.recv())
        except ChannelClosed:
            return frames
    raise AssertionError("the agent did not close the connection")


def test_agent_speaks_hello_first_with_its_version_python_and_pid(spawn_agent) -> None:
    started = spawn_agent()
    channel = FramedChannel(started.sock)
    hello = codec.check_hello(channel.recv())
    assert hello["role"] == "agent"
    assert hello["version"] == codec.PROTOCOL_VERSION
    assert hello["agent_version"]
    assert re.fullmatch(r"3\.\d+\.\d+.*", hello["python"])
    assert hello["pid"] == started.process.pid


def test_handshake_works_when_the_host_says_hello_first(spawn_agent) -> None:
    started = spawn_agent()
    channel = FramedChannel(started.sock)
    peer = channel.handshake("supervisor")  # send first, then read: FramedChannel's own order
    assert peer["role"] == "agent"
    channel.send_raw(codec.request(1, "ping"))
    answer = channel.recv()
    assert answer.kind == "response" and answer.header == {"kind": "response", "id": 1, "ok": True, "result": {}}


def test_agent_info_describes_the_agent_and_lists_its_ops(agent: AgentClient) -> None:
    info = agent.call("agent.info")
    assert info["agent_version"] == agent.hello["agent_version"]
    assert info["python"] == agent.hello["python"]
    assert info["pid"] == agent.process.pid
    assert info["kernel"] == os.uname().release
    assert info["hostname"] == socket.gethostname()
    assert 0 <= info["uptime_seconds"] < 60
    assert {"ping", "proc.start", "fs.write_begin", "agent.configure"} <= set(info["ops"])


def test_unknown_op_is_answered_with_UnknownOp_listing_the_known_ops(agent: AgentClient) -> None:
    error = agent.error("proc.teleport", pid=1)
    assert error["type"] == "UnknownOp"
    assert "proc.teleport" in error["message"]
    assert "proc.start" in error["allowed"]
    assert agent.call("ping") == {}


def test_missing_or_mistyped_arguments_get_InvalidArgument_naming_the_field(agent: AgentClient) -> None:
    assert agent.error("proc.start")["field"] == "argv"
    assert agent.error("proc.start", argv=[])["field"] == "argv"
    assert agent.error("proc.start", argv=["true"], env={"A": 1})["field"] == "env"
    assert agent.error("proc.start", argv=["true"], stdin="yes")["field"] == "stdin"
    assert agent.error("fs.read", path="/etc/hostname", length=-1)["field"] == "length"
    assert agent.error("fs.stat", path=7)["field"] == "path"
    assert agent.error("proc.signal", pid="1")["field"] == "pid"
    # values read as either SDK shows them (mvm.protocol.shown), not as Python reprs
    assert agent.error("fs.stat", path=None)["message"] == "path: is required"
    assert agent.error("fs.read", path="/etc/hostname", length=None, offset=True)["message"] == \
        "offset: must be an integer, got true"


def test_a_request_before_hello_makes_the_agent_close_the_connection(spawn_agent) -> None:
    started = spawn_agent()
    channel = FramedChannel(started.sock)
    assert channel.recv().kind == "hello"
    channel.send_raw(codec.request(1, "ping"))
    assert _recv_until_closed(channel) == []
    assert started.wait() == 0


def test_an_incompatible_protocol_version_closes_the_connection(spawn_agent) -> None:
    started = spawn_agent()
    channel = FramedChannel(started.sock)
    assert channel.recv().kind == "hello"
    channel.send({"kind": "hello", "protocol": "mvm", "version": codec.PROTOCOL_VERSION + 1, "role": "future"})
    assert _recv_until_closed(channel) == []
    assert started.wait() == 0


@pytest.mark.parametrize("garbage", [
    b"\xff" * 64,
    b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n",
    codec.PREFIX.pack(codec.MAX_HEADER + 1, 0),
    codec.PREFIX.pack(10, codec.MAX_PAYLOAD + 1),
    codec.PREFIX.pack(4, 0) + b"[1] ",
    codec.PREFIX.pack(12, 0) + b'{"kind":"x"}',
], ids=["ff-bytes", "http", "huge-header", "huge-payload", "json-array", "unknown-kind"])
def test_garbage_bytes_make_the_agent_close_the_connection_cleanly(agent: AgentClient, garbage: bytes) -> None:
    assert agent.call("ping") == {}
    agent.sock.sendall(garbage)
    assert agent.closed.wait(5), "the agent kept the connection open after garbage"
    assert agent.process.wait(5) == 0


def test_a_second_hello_is_answered_and_drops_per_connection_state(agent: AgentClient, tmp_path: Path) -> None:
    pid = agent.start(["sh", "-c", "sleep 0.5; echo still-here"])
    handle = agent.call("fs.write_begin", path=str(tmp_path / "upload.bin"))["handle"]
    agent.call("fs.write_chunk", b"partial", handle=handle)

    agent.channel.send_raw(codec.hello("supervisor"))  # as a host does after reconnecting
    answer = agent.hellos.get(timeout=5)
    assert answer.header["role"] == "agent"

    error = agent.error("fs.write_chunk", b"more", handle=handle)
    assert error["type"] == "InvalidArgument" and error["field"] == "handle"
    assert list(tmp_path.iterdir()) == [], "the dropped handle's temp file must be removed"
    listed = {p["pid"]: p for p in agent.call("proc.list")["processes"]}
    assert listed[pid]["running"], "processes survive a reconnect"
    done = agent.wait_exit(pid)
    assert done.stdout == b"still-here\n" and done.exit_code == 0


def test_closing_the_channel_ends_the_agent_and_everything_it_started(agent: AgentClient) -> None:
    pid = agent.start(["sh", "-c", "setsid sleep 300 & echo $!; exec sleep 300"])
    assert wait_until(lambda: agent.events_for(pid))
    grandchild = int(agent.events_for(pid)[0].payload)
    assert pid_exists(pid) and pid_exists(grandchild)
    agent.close()
    assert agent.process.wait(10) == 0
    assert wait_until(lambda: not pid_exists(pid) and not pid_exists(grandchild))


def test_sigterm_ends_the_agent_and_everything_it_started(agent: AgentClient) -> None:
    pid = agent.start(["sleep", "300"])
    agent.process.terminate()
    assert agent.process.wait(10) == 0
    assert wait_until(lambda: not pid_exists(pid))


def test_waiting_stdin_writes_do_not_hold_up_other_requests(agent: AgentClient) -> None:
    pids = [agent.start(["sleep", "30"], stdin=True) for _ in range(12)]
    blob = b"x" * (1024 * 1024)  # more than a pipe holds: these writes wait for a reader that never comes
    pending = [agent.send_request("proc.stdin", {"pid": pid, "eof": False}, blob) for pid in pids]
    assert agent.call("ping", timeout=30) == {}
    assert agent.call("fs.stat", path="/")["type"] == "dir"
    assert not any(agent.answered(ident) for ident in pending)  # answered while every write still waits
    for pid in pids:
        agent.call("proc.signal", pid=pid, signal="KILL", group=True)
    for ident in pending:  # the process died: the write is answered, not left hanging
        result = agent.response(ident).header["result"]
        assert result["closed"] is True and result["written"] < len(blob)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
_paths = st.sampled_from(["/", "/nonexistent/file", "relative/path", "", "/proc/self/status", "/\ud800"])
_arg_names = ["path", "pid", "offset", "length", "handle", "signal", "group", "eof", "commit"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(["ping", "agent.info", "proc.list", "fs.stat", "fs.read", "fs.list", "proc.signal",
                        "proc.stdin", "fs.write_chunk", "fs.write_end", "no.such.op"]),
    args=st.dictionaries(st.sampled_from(_arg_names), _json | _paths, max_size=4),
    payload=st.binary(max_size=64),
)
def test_arbitrary_arguments_always_get_a_typed_answer_and_never_crash_the_agent(
        agent: AgentClient, op: str, args: dict, payload: bytes) -> None:
    frame = agent.request(op, args, payload)
    if not frame.header["ok"]:
        error = frame.header["error"]
        assert error["type"] in ERROR_TYPES - {"Internal"}, error
    assert agent.call("ping") == {}


@pytest.mark.skipif(os.geteuid() != 0 or not unshare_available("--pid", "--fork", "--mount-proc"),
                    reason="needs root and unshare --pid")
def test_as_pid_1_the_agent_forks_and_serves_from_a_child(spawn_agent) -> None:
    started = spawn_agent(prefix=["unshare", "--pid", "--fork", "--mount-proc"])
    client = started.client()
    assert client.hello["pid"] != 1, "the agent proper runs in a child of PID 1"
    assert client.call("agent.info")["pid"] == client.hello["pid"]
    done = client.run(["sh", "-c", "echo $PPID; tr '\\0\\n' '  ' < /proc/1/cmdline"])
    parent, init_cmdline = done.stdout.decode().split("\n", 1)
    assert "mvm.agent" in init_cmdline
    assert int(parent) == client.hello["pid"]
    client.close()
    assert started.wait(10) == 0


@pytest.mark.parametrize("python", guest_pythons() or [pytest.param("none", marks=pytest.mark.skip("no guest python"))])
def test_the_installed_agent_runs_on_guest_pythons_with_only_the_stdlib(spawn_agent, tmp_path: Path,
                                                                         python: str) -> None:
    started = spawn_agent(command=installed_agent_command(tmp_path / "root", python))
    client = started.client()
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert client.hello["python"] == version
    done = client.run([python, "-c", "import sys; print(sys.flags.isolated)"])
    assert done.stdout == b"0\n", "processes do not inherit the agent's -I"
    client.call("fs.write", b"hello", path=str(tmp_path / "f.txt"))
    assert (tmp_path / "f.txt").read_bytes() == b"hello"
    client.close()
    assert started.wait(10) == 0


def test_an_unusable_fd_is_a_clear_startup_error() -> None:
    result = subprocess.run([sys.executable, "-m", "mvm.agent", "--fd", "97"], capture_output=True, timeout=20)
    assert result.returncode == 2
    assert b"--fd 97" in result.stderr
