"""``mode="open"``: an explicit opt-in for a real interface (QEMU user networking on the
VM, pasta on namespaces). Only the host's loopback is contacted -- through the address
each backend maps to it (10.0.2.2) -- never anything beyond this machine."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from nethelpers import connect, create, start_guest_servers

import mvm

PROBE = r'''
import json, socket, sys
out = {"interfaces": sorted(n for _, n in socket.if_nameindex())}
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect(("10.0.2.2", 9))  # picks a route, sends nothing
out["address"] = probe.getsockname()[0]
with socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=20) as conn:
    out["greeting"] = conn.recv(100).decode()
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def box(backend: str) -> Iterator[mvm.Sandbox]:
    with create(backend, mvm.network(mode="open")) as sandbox:
        yield sandbox


def test_open_mode_has_an_interface_and_reaches_the_host_loopback(box: mvm.Sandbox, host_tcp: tuple) -> None:
    port, seen = host_tcp
    before = len(seen)
    box.files.write("/srv/probe.py", PROBE)
    result = box.commands.run(["python3", "/srv/probe.py", str(port)], timeout_seconds=120)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["interfaces"] == ["eth0", "lo"]
    assert out["address"] == "10.0.2.15"
    assert out["greeting"] == "hello-from-host"
    assert len(seen) == before + 1 and seen[-1][0] == "127.0.0.1"  # it arrived on the host's loopback
    assert box.files.read("/etc/resolv.conf") == b"nameserver 10.0.2.3\n"


def test_open_mode_is_marked_in_describe_and_cannot_be_narrowed_live(box: mvm.Sandbox) -> None:
    info = box.describe()
    assert info.network["mode"] == "open"
    assert info.details["network"].startswith("open: ")
    assert any("network mode open" in note for note in info.details["notes"])
    with pytest.raises(mvm.InvalidNetworkPolicy) as err:
        box.network.update(allow=["pypi.org:443"])
    assert err.value.field == "network.mode"


def test_forwards_work_in_open_mode_too(box: mvm.Sandbox) -> None:
    start_guest_servers(box)
    with box.ports.forward(guest_port=8000) as fwd, connect(fwd.host_port) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
