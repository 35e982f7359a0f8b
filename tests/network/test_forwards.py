"""Port forwards over the agent channel, in a ``mode="deny"`` sandbox (forwards need no
guest network) -- and the proofs that deny mode has none."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from nethelpers import connect, create, read_all, start_guest_servers, wait_guest_file
from waiting import wait_stalled

import mvm
from mvm.sdk.models import PortForward


@pytest.fixture(scope="module")
def box(backend: str) -> Iterator[mvm.Sandbox]:
    with create(backend, mvm.network(mode="deny")) as sandbox:
        start_guest_servers(sandbox)
        yield sandbox


@pytest.fixture(scope="module")
def echo(box: mvm.Sandbox) -> PortForward:
    return box.ports.forward(host="127.0.0.1", host_port=0, guest_port=8000)


def _is_vm(box: mvm.Sandbox) -> bool:
    return box.describe().isolation == "vm"


def _wait_idle(box: mvm.Sandbox, fwd: PortForward, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = next(f for f in box.ports.list() if f.id == fwd.id)
        if info.connections == 0:
            return info.to_dict()
        assert time.monotonic() < deadline, f"{info.connections} connections still open"
        time.sleep(0.05)


def _echo_round(port: int, size: int) -> bool:
    data = os.urandom(size)
    with connect(port) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = read_all(sock)
        sender.join()
    return echoed == data


# ---- basics ----------------------------------------------------------------------------------


def test_forward_binds_exactly_the_host_address_and_is_described_logged_and_audited(
        box: mvm.Sandbox, echo: PortForward) -> None:
    assert echo.host == "127.0.0.1" and echo.host_port > 0 and echo.guest_port == 8000
    assert echo.audit_id and echo.audit_id.startswith("aud_")
    assert _echo_round(echo.host_port, 1000)
    info = box.describe()
    assert info.network["mode"] == "deny"
    assert [f["id"] for f in info.network["forwards"]] == [echo.id]
    assert [f.id for f in box.ports.list()] == [echo.id]
    messages = [(e.source, e.message) for e in box.logs()]
    assert ("audit", "port.forward ok") in messages
    assert any(src == "network" and f"127.0.0.1:{echo.host_port} -> guest 127.0.0.1:8000 opened" in msg
               for src, msg in messages)


def test_many_concurrent_connections(box: mvm.Sandbox, echo: PortForward) -> None:
    size = 64 * 1024 if _is_vm(box) else 512 * 1024
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(_echo_round(echo.host_port, size)))
               for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [True] * 20
    _wait_idle(box, echo)


def test_half_close_in_both_directions(box: mvm.Sandbox) -> None:
    # host -> guest EOF first: the echo server still answers after our EOF.
    with box.ports.forward(guest_port=8000) as fwd, connect(fwd.host_port) as sock:
        sock.sendall(b"question")
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"question"
    # guest -> host EOF first: we still talk after the guest's EOF, and it hears us.
    with box.ports.forward(guest_port=8001) as fwd, connect(fwd.host_port) as sock:
        assert read_all(sock) == b"banner\n"
        sock.sendall(b"x" * 5000)
        sock.shutdown(socket.SHUT_WR)
        wait_guest_file(box, "/tmp/halfclose.txt")
        assert box.files.read("/tmp/halfclose.txt") == b"5000"
        assert sock.recv(10) == b""


def test_a_large_transfer_both_ways(box: mvm.Sandbox, echo: PortForward) -> None:
    size = (8 if _is_vm(box) else 128) * 1024 * 1024
    block = os.urandom(1 << 20)
    sent_digest = hashlib.sha256()
    got_digest = hashlib.sha256()
    received = 0
    with connect(echo.host_port, timeout=120) as sock:
        def send() -> None:
            for index in range(size // len(block)):
                chunk = index.to_bytes(8, "big") + block[8:]
                sent_digest.update(chunk)
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        started = time.monotonic()
        sender.start()
        while data := sock.recv(1 << 20):
            got_digest.update(data)
            received += len(data)
        sender.join()
        elapsed = time.monotonic() - started
    assert received == size and got_digest.hexdigest() == sent_digest.hexdigest()
    print(f"{size >> 20} MiB echoed through the forward in {elapsed:.2f} s")
    info = _wait_idle(box, echo)
    assert info["bytes_in"] >= size and info["bytes_out"] >= size


def test_a_guest_server_dying_mid_stream(box: mvm.Sandbox) -> None:
    box.files.write("/srv/dies.py", (
        "import os, signal, socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('127.0.0.1', 8005)); s.listen(); open('/tmp/dies.ready', 'w').close()\n"
        "c, _ = s.accept(); c.sendall(b'z' * (1 << 20)); os.kill(os.getpid(), signal.SIGKILL)\n"))
    server = box.commands.start(["python3", "/srv/dies.py"])
    wait_guest_file(box, "/tmp/dies.ready")
    with box.ports.forward(guest_port=8005) as fwd:
        with connect(fwd.host_port) as sock:
            got = 0
            try:
                while data := sock.recv(1 << 16):
                    got += len(data)
            except ConnectionResetError:
                pass
            assert got <= 1 << 20  # what it sent before dying (or less, after a reset): then EOF/reset
        assert _wait_idle(box, fwd)["total_connections"] == 1
        # Its listening socket is gone once it is: wait for that, not for how the stream ended.
        assert server.wait(timeout=60) == 128 + 9
        try:  # nothing listens any more: closed at once (the reset may even beat connect()'s return)
            with connect(fwd.host_port) as sock:
                assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
        info = _wait_idle(box, fwd)
        assert (info["total_connections"], info["failed_connections"]) == (2, 1), info
        failures = [e.message for e in box.logs() if e.source == "network" and "failed" in e.message]
        assert f"port forward {fwd.id}: connection to guest 127.0.0.1:8005 failed: nothing accepts connections " \
               "on 127.0.0.1:8005 in the sandbox" in failures, failures
    assert not any(f.id == fwd.id for f in box.ports.list())


def test_the_relay_path_is_the_supervisor_on_namespaces_and_the_agent_channel_on_vms(box: mvm.Sandbox) -> None:
    # namespace: the agent hands the guest's socket over and the supervisor splices it
    # to the client; a VM's agent is another kernel: its bytes come as stream frames
    expected = "agent-channel" if _is_vm(box) else "supervisor-splice"
    assert box.describe().network["relay"] == expected


def test_a_reset_on_either_side_reaches_the_other(box: mvm.Sandbox, echo: PortForward) -> None:
    with box.ports.forward(guest_port=8006) as fwd:
        with connect(fwd.host_port) as sock:  # the guest resets
            sock.sendall(b"reset-me\n")
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
        with connect(fwd.host_port) as sock:  # the host's client resets
            sock.sendall(b"watch\n")
            wait_guest_file(box, "/tmp/reset-watching")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        wait_guest_file(box, "/tmp/reset-seen.txt")
        assert box.files.read("/tmp/reset-seen.txt") == b"reset"
        info = _wait_idle(box, fwd)
        assert (info["total_connections"], info["failed_connections"]) == (2, 0)
    assert _echo_round(echo.host_port, 1000)  # and the sandbox's other forwards go on


def test_one_slow_reader_stalls_neither_other_connections_nor_commands(box: mvm.Sandbox, echo: PortForward) -> None:
    vm = _is_vm(box)
    source = box.ports.forward(guest_port=8002)
    hole = box.ports.forward(guest_port=8004)
    total = 96 * 1024 * 1024
    slow = connect(source.host_port, timeout=120)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    slow.sendall(f"slow {total}\n".encode())  # ...and then read nothing for a while
    pusher = connect(hole.host_port)  # the guest never reads this one
    pusher.setblocking(False)
    pushed = 0
    try:
        for _ in range(4096):
            pushed += pusher.send(b"p" * 65536)
    except BlockingIOError:
        pass
    progress = wait_stalled(lambda: int(box.files.read("/tmp/progress-slow") or b"0") if box.files.exists(
        "/tmp/progress-slow") else 0, "the guest's sender to the slow reader")
    # (a stall of the channel would time these out: the sockets' and pytest's timeouts)
    for _ in range(3):
        assert _echo_round(echo.host_port, 256 * 1024)
    assert box.commands.run(["echo", "still here"], timeout_seconds=60).stdout == "still here\n"
    # kernel socket buffers (autotuned) and one window per side -- not the whole stream
    assert progress < 48 * 1024 * 1024, progress
    assert pushed < 48 * 1024 * 1024, pushed
    if not vm:  # drain it: every byte arrives, in order
        got = read_all(slow)
        expected = hashlib.sha256()
        block = hashlib.sha256(b"mvm").digest() * 4096
        for offset in range(0, total, len(block)):
            expected.update(block[: total - offset])
        assert len(got) == total and hashlib.sha256(got).digest() == expected.digest()
    slow.close()
    pusher.close()
    source.close()
    hole.close()


def test_a_refused_guest_port_closes_the_client_connection(box: mvm.Sandbox) -> None:
    with box.ports.forward(guest_port=8999) as fwd:
        try:  # (the reset may even beat connect()'s return on a busy host)
            with connect(fwd.host_port) as sock:
                assert sock.recv(10) == b""
        except ConnectionResetError:
            pass


# ---- binding rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "[::]"])
def test_wildcard_binds_are_refused_unless_asked_for(box: mvm.Sandbox, host: str) -> None:
    with pytest.raises(mvm.InvalidArgument) as err:
        box.ports.forward(host=host, host_port=0, guest_port=8000)
    assert err.value.field == "host" and "allow_wildcard" in str(err.value)


def test_a_port_in_use_is_a_clear_error(box: mvm.Sandbox) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(mvm.PortInUse) as err:
        box.ports.forward(host_port=port, guest_port=8000)
    assert isinstance(err.value, mvm.InvalidArgument) and err.value.field == "host_port"
    assert f"127.0.0.1:{port} is already in use" in str(err.value)
    taken.close()
    with pytest.raises(mvm.InvalidArgument) as err:
        box.ports.forward(host_port=0, guest_port=0)
    assert err.value.field == "guest_port"
    with pytest.raises(mvm.InvalidArgument) as err:
        box.ports.forward(host="not-an-address", guest_port=8000)
    assert err.value.field == "host"


def test_close_and_connection_bound_forwards(box: mvm.Sandbox) -> None:
    fwd = box.ports.forward(guest_port=8000)
    assert _echo_round(fwd.host_port, 100)
    fwd.close()
    fwd.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        connect(fwd.host_port)
    other = mvm.Sandbox.connect(box.id)
    attached = other.ports.forward(guest_port=8000, detach=False)
    assert _echo_round(attached.host_port, 100)
    other.close()  # the forward ends with the connection that made it
    deadline = time.monotonic() + 10
    while any(f.id == attached.id for f in box.ports.list()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):
        connect(attached.host_port)
    closed_by_port = box.ports.forward(guest_port=8000)
    box.ports.close(closed_by_port.host_port)
    with pytest.raises(mvm.InvalidArgument):
        box.ports.close(closed_by_port.host_port)


# ---- deny mode: no network at all --------------------------------------------------------------------


def _host_address() -> str:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("198.51.100.1", 9))  # a UDP connect sends nothing: it only picks the route
        return str(probe.getsockname()[0])
    except OSError:
        return "10.0.2.2"
    finally:
        probe.close()


DENY_PROBE = r'''
import json, os, socket, sys
out = {"interfaces": sorted(name for _, name in socket.if_nameindex())}
for name, (host, port) in {"outside": ("198.51.100.1", 80), "host": (sys.argv[1], int(sys.argv[2])),
                           "slirp_gateway": ("10.0.2.2", int(sys.argv[2])),
                           "host_loopback": ("127.0.0.1", int(sys.argv[2]))}.items():
    try:
        socket.create_connection((host, port), timeout=5).close()
        out[name] = "connected"
    except OSError as exc:
        out[name] = type(exc).__name__ + ":" + str(exc.errno)
try:
    out["dns"] = socket.getaddrinfo("pypi.org", 443)[0][4][0]
except OSError as exc:
    out["dns"] = "failed:" + type(exc).__name__
print(json.dumps(out))
'''


def test_deny_mode_has_no_route_no_host_and_no_names(box: mvm.Sandbox, host_tcp: tuple) -> None:
    import json

    port, seen = host_tcp
    box.files.write("/srv/deny_probe.py", DENY_PROBE)
    result = box.commands.run(["python3", "/srv/deny_probe.py", _host_address(), str(port)], timeout_seconds=120)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["interfaces"] == ["lo"]
    assert out["outside"].startswith("OSError:101")  # ENETUNREACH: no route at all
    assert out["host"].startswith("OSError:101")
    assert out["slirp_gateway"].startswith("OSError:101")
    assert out["host_loopback"].startswith("ConnectionRefusedError")  # the guest's own loopback
    assert out["dns"].startswith("failed:")
    assert seen == []  # the host server never heard from the sandbox
    assert "HTTP_PROXY" not in box.commands.run(["env"]).stdout


def test_forwards_end_with_the_sandbox(backend: str) -> None:
    if backend != "namespace":
        pytest.skip("one backend is enough for this lifecycle check")
    sandbox = create(backend)
    fwd = sandbox.ports.forward(guest_port=8000)
    sandbox.destroy()
    with pytest.raises(ConnectionRefusedError):
        connect(fwd.host_port)
