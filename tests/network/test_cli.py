"""``mvmctl port`` and ``mvmctl network`` against a real sandbox (namespace backend: fast)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from waiting import wait_for
from nethelpers import connect, start_guest_servers

import mvm
from mvm.cli.network import parse_spec
from mvm.errors import InvalidArgument

MVMCTL = [sys.executable, "-m", "mvm.cli.main"]


def mvmctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*MVMCTL, *args], capture_output=True, text=True, timeout=120, env={**os.environ})
    if check and proc.returncode != 0:
        raise AssertionError(f"mvmctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def box() -> Iterator[mvm.Sandbox]:
    with mvm.Sandbox.create("python-3.13", name="net-cli-box", backend="namespace", ttl="10m") as sandbox:
        start_guest_servers(sandbox)
        yield sandbox


def _echo(port: int) -> bytes:
    with connect(port, timeout=10) as sock:
        sock.sendall(b"via-cli")
        return sock.recv(7)


def test_spec_parsing() -> None:
    assert parse_spec("127.0.0.1:8080:8000") == ("127.0.0.1", 8080, 8000)
    assert parse_spec("8080:8000") == ("127.0.0.1", 8080, 8000)
    assert parse_spec("[::1]:0:8000") == ("::1", 0, 8000)
    for bad in ("8000", "a:b:c", "1:2:3:4", "[::1:80:90"):
        with pytest.raises(InvalidArgument):
            parse_spec(bad)


def test_detached_forward_ls_and_close(box: mvm.Sandbox) -> None:
    made = json.loads(mvmctl("port", "forward", box.name, "127.0.0.1:0:8000", "--detach", "--json").stdout)
    assert made["host"] == "127.0.0.1" and made["guest_port"] == 8000 and made["detached"] is True
    assert _echo(made["host_port"]) == b"via-cli"  # it outlives the mvmctl process
    listed = json.loads(mvmctl("port", "ls", box.name, "--json").stdout)
    assert [f["host_port"] for f in listed] == [made["host_port"]]
    assert "127.0.0.1:" in mvmctl("port", "ls", box.name).stdout
    mvmctl("port", "close", box.name, str(made["host_port"]))
    assert json.loads(mvmctl("port", "ls", box.name, "--json").stdout) == []


def test_foreground_forward_ends_with_ctrl_c(box: mvm.Sandbox) -> None:
    proc = subprocess.Popen([*MVMCTL, "port", "forward", box.name, "0:8000", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert proc.stdout is not None
        lines = []
        while not "".join(lines).rstrip().endswith("}"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            lines.append(line)
        made = json.loads("".join(lines))
        assert made["detached"] is False
        assert _echo(made["host_port"]) == b"via-cli"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not box.ports.list(), "the forward to close with mvmctl", timeout=10)
    with pytest.raises(ConnectionRefusedError):
        connect(made["host_port"])


def test_wildcards_need_the_flag(box: mvm.Sandbox) -> None:
    refused = mvmctl("port", "forward", box.name, "0.0.0.0:0:8000", "--detach", check=False)
    assert refused.returncode == 2 and "--allow-wildcard" in refused.stderr


def test_network_show_and_update(box: mvm.Sandbox) -> None:
    shown = json.loads(mvmctl("network", "show", box.name, "--json").stdout)
    assert shown["mode"] == "deny" and shown["interface"] == "loopback-only"
    updated = json.loads(mvmctl("network", "update", box.name, "--allow", "pypi.org:443", "--json").stdout)
    assert updated["mode"] == "allow" and updated["allow"] == ["pypi.org:443"]
    assert "egress" in mvmctl("network", "show", box.name).stdout
    bad = mvmctl("network", "update", box.name, "--allow", "pypi.org", check=False)
    assert bad.returncode == 2 and "network.allow" in bad.stderr
    assert json.loads(mvmctl("network", "update", box.name, "--deny", "--json").stdout)["mode"] == "deny"
