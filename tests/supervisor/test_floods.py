"""A guest that floods, on both backends: stdout (far past every cap), the streaming
path, a process that never reads its stdin, a disk filled to the brim, a fork bomb.

Each runs beside a neighbour sandbox whose ``commands.run`` must keep answering while
the flood goes on, and the flooder's own limits must hold (output cap, log cap, disk
size, pids limit) while it stays usable. The floods here are small enough for the
suite's budget; ``bench/flood_bench.py`` pushes 1 GiB and prints the figures.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from waiting import wait_for

import mvm
from mvm import errors
from mvm.backends import PREFERENCE, availability
from mvm.paths import sandboxes_dir
from mvm.spec import Resources
from mvm.supervisor.logbook import MAX_LOG_BYTES

BACKENDS = [name for name in PREFERENCE if availability(name).ok] or ["namespace"]
FLOOD_PIECE = 4 * 1024 * 1024
#: namespace: the default disk, twice the default memory_mb -- filling it must end in
#: "No space left on device", not in an out-of-memory kill (the disk is not memory)
ROOTFS_MB = {"namespace": Resources().rootfs_size_mb, "vm": 512}


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[mvm.Sandbox, mvm.Sandbox]]:
    """A flooder and its neighbour on one backend (the flooder with a small disk and pids limit)."""
    backend = request.param
    flooder = mvm.Sandbox.create("python-3.13", backend=backend, ttl="15m",
                                 resources=mvm.resources(rootfs_size_mb=ROOTFS_MB[backend], max_processes=64))
    neighbour = mvm.Sandbox.create("python-3.13", backend=backend, ttl="15m")
    try:
        yield flooder, neighbour
    finally:
        flooder.kill()
        neighbour.kill()


def _in_background(fn: object) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(fn())  # type: ignore[operator]
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def pair_backend(sandbox: mvm.Sandbox) -> str:
    return str(sandbox.describe().details["backend"])


def _neighbour_answers(neighbour: mvm.Sandbox, times: int = 3) -> None:
    for number in range(times):
        result = neighbour.commands.run(["echo", f"neighbour {number}"], timeout_seconds=120)
        assert (result.exit_code, result.stdout) == (0, f"neighbour {number}\n")


def test_stdout_flood_is_capped_and_the_neighbour_goes_on(pair: tuple[mvm.Sandbox, mvm.Sandbox]) -> None:
    flooder, neighbour = pair
    cap = 64 * 1024
    # floods 4 MiB pieces of "y" lines (the log's worst case: one entry per 2 bytes) until told to stop
    script = (f"while [ ! -e /tmp/stop-flood ]; do yes | head -c {FLOOD_PIECE}; touch /tmp/flooding; done")
    thread, outcome = _in_background(
        lambda: flooder.commands.run(["sh", "-c", script], max_output_bytes=cap, timeout_seconds=600))
    wait_for(lambda: flooder.files.exists("/tmp/flooding"), "a first 4 MiB flooded", timeout=300)
    _neighbour_answers(neighbour)
    assert thread.is_alive()  # the flood went on all along: it only ends on the stop file
    flooder.files.write("/tmp/stop-flood", b"")  # the flooder's own agent answers too
    thread.join(300)
    assert not thread.is_alive()
    result = outcome[0]
    assert isinstance(result, mvm.CommandResult), result
    assert result.exit_code == 0
    assert result.truncated and result.stdout == "y\n" * (cap // 2)
    assert result.stdout_bytes >= FLOOD_PIECE and result.stdout_bytes % FLOOD_PIECE == 0
    log = sandboxes_dir() / flooder.id / "logs.jsonl"
    assert log.stat().st_size <= MAX_LOG_BYTES + 64 * 1024  # capped (the cap notice and system lines past it)
    assert any("log limit" in entry.message for entry in flooder.logs(tail=50))


def test_the_streaming_path_delivers_a_flood_whole(pair: tuple[mvm.Sandbox, mvm.Sandbox]) -> None:
    flooder, neighbour = pair
    size = 16 * 1024 * 1024
    process = flooder.commands.start(["sh", "-c", f"echo ready; read go; yes | head -c {size}"], stdin=True)
    chunks = process.output()
    # "ready" received: the attach is live, so the flood is let go only now (what comes out
    # before an attach is kept for it up to a replay limit, not whole)
    assert next(chunks) == ("stdout", "ready\n")
    process.send_stdin("go\n")
    received = 0
    for stream, text in chunks:
        assert stream == "stdout" and set(text) <= {"y", "\n"}
        received += len(text)
    assert received == size
    assert process.wait() == 0
    _neighbour_answers(neighbour, 1)


def test_a_process_that_never_reads_stdin_costs_its_timeout_only(pair: tuple[mvm.Sandbox, mvm.Sandbox]) -> None:
    flooder, neighbour = pair
    data = b"x" * (1024 * 1024)  # one frame: fed through the agent's pipe, not staged as a file
    thread, outcome = _in_background(
        lambda: flooder.commands.run(["sh", "-c", "touch /tmp/deaf; exec sleep 600"], stdin=data,
                                     timeout_seconds=5))
    wait_for(lambda: flooder.files.exists("/tmp/deaf"), "the deaf process to start", timeout=120)
    _neighbour_answers(neighbour, 1)
    assert flooder.files.read("/tmp/deaf") == b""  # the flooder answers while its stdin is stuck
    thread.join(120)
    assert not thread.is_alive()
    assert isinstance(outcome[0], errors.CommandTimeout), outcome[0]
    assert not [p for p in flooder.commands.list() if p.running and "sleep" in " ".join(p.argv)]


def _agent_pid(sandbox: mvm.Sandbox) -> str:
    """The guest agent's pid (a command's parent): another one means the agent was replaced."""
    return sandbox.commands.run(["sh", "-c", "echo $PPID"]).stdout


def test_filling_the_disk_stops_at_its_size(pair: tuple[mvm.Sandbox, mvm.Sandbox]) -> None:
    flooder, neighbour = pair
    if pair_backend(flooder) == "namespace":  # the defaults: a disk bigger than the memory
        limits = flooder.describe().details["limits"]
        assert (limits["rootfs_size_mb"], limits["memory_mb"]) == (Resources().rootfs_size_mb, Resources().memory_mb)
        assert limits["rootfs_size_mb"] > limits["memory_mb"]
    flooder.files.write("/root/kept.txt", b"written before the flood")
    agent = _agent_pid(flooder)
    result = flooder.commands.run(["sh", "-c", "cat /dev/zero > /root/fill; echo status $?"], timeout_seconds=600)
    # the writer got ENOSPC and went on (no out-of-memory kill: it printed its status)
    assert "No space left on device" in result.stderr and result.stdout == "status 1\n", result
    filled = int(flooder.commands.run(["stat", "-c", "%s", "/root/fill"]).stdout)
    size = ROOTFS_MB[pair_backend(flooder)] * 1024 * 1024
    assert 0 < filled <= size
    if pair_backend(flooder) == "namespace":  # the template is the lower layer: the disk holds writes only
        assert filled > 0.9 * size
    assert _agent_pid(flooder) == agent  # the same agent answers: it was never killed
    _neighbour_answers(neighbour, 1)
    assert flooder.files.read("/root/kept.txt") == b"written before the flood"
    flooder.files.remove("/root/fill")
    flooder.files.write("/root/after.txt", b"room again")
    assert flooder.files.read("/root/after.txt") == b"room again"


def test_a_fork_bomb_stops_at_the_pids_limit(pair: tuple[mvm.Sandbox, mvm.Sandbox]) -> None:
    flooder, neighbour = pair  # max_processes=64 (the agent's threads count among them)
    holder = flooder.commands.start(["python3", "-c", (
        "import os, time\n"
        "children, error = 0, None\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as exc:\n"
        "        error = exc.errno; break\n"
        "    if pid == 0:\n"
        "        time.sleep(600); os._exit(0)\n"
        "    children += 1\n"
        "print(children, error, flush=True)\n"
        "time.sleep(600)\n")])  # holds every pid it got
    children, error = next(holder.lines()).split()
    assert error == "11" and 0 < int(children) < 64  # EAGAIN from the pids limit
    with pytest.raises(errors.TooLarge) as refused:  # the limit is full: a start is refused, typed
        flooder.commands.run(["true"])
    assert refused.value.details["field"] == "max_processes"
    holder.kill()
    holder.wait(timeout=120)

    def starts() -> bool:
        try:
            return flooder.commands.run(["true"]).exit_code == 0
        except errors.TooLarge:
            return False  # the killed children are not all reaped yet

    wait_for(starts, "room for a process again", timeout=120, interval=0.2)
    if pair_backend(flooder) == "vm":  # enforced by the agent in the guest, and said so
        assert flooder.describe().details["guest_limits"]["max_processes"].startswith("64 tasks")
    # a real bomb: forks on forever inside the limit until killed
    # (each level forks two and returns: the churn goes on in orphans of its session, while
    # the leader waits on a builtin read, which needs no fork)
    bomb = flooder.commands.start(["sh", "-c", "touch /tmp/bombing; b() { b | b & }; b; read never"], stdin=True)
    wait_for(lambda: flooder.files.exists("/tmp/bombing"), "the bomb to go off", timeout=120)
    _neighbour_answers(neighbour)
    try:  # while it churns at the limit, a start is refused with a typed error (or gets a freed slot)
        flooder.commands.run(["true"])
    except errors.TooLarge as exc:
        assert exc.details["field"] == "max_processes"
    bomb.kill()  # its whole session, whether its leader still waits or died on a refused fork
    assert bomb.wait(timeout=120) != 0
    # the sandbox is usable again once the killed bomb is reaped: not one of its shells is
    # left (the shell counting them is alone); until then a fork may still fail
    def shells_left() -> str:
        try:
            return flooder.commands.run(["sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sh"],
                                        timeout_seconds=120).stdout
        except errors.TooLarge:
            return "no room to count yet"

    wait_for(lambda: shells_left() == "1\n", "the bomb's shells to be gone", timeout=120, interval=0.5)
