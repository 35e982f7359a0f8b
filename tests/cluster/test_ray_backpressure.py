"""A remote caller that stops reading holds the process, not the node agent's memory
(docs/scale-out.md, "Flow control on the Ray hop"): the same stalled-reader scenario as
tests/supervisor/test_stream_backpressure.py, over the cluster path (tests/cluster/conftest.py).

A guest process floods its stdout while the caller, on another node than the sandbox's,
reads nothing: the flooder blocks once the windows are full, the node agent's relay of the
request never holds more than ``STREAM_WINDOW`` (its own answer to ``relay_status``, a
real query of the actor) and its resident memory grows by far less than the flood, another
request on the same sandbox completes meanwhile, and once the caller reads it gets every
byte, in order. Both relays: a process's output stream (``stream``) and ``commands.run``'s
``on_stdout`` (``call_streaming``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import ray
from flooding import MIB, assert_all_arrived, expected_digest, flood_script
from waiting import wait_for, wait_stalled

import mvm
from mvm.protocol.codec import STREAM_WINDOW

if TYPE_CHECKING:
    from conftest import SimulatedCluster

#: Far more than all the windows on the way (agent, supervisor, node agent, Ray hop).
FLOOD_MIB = 64


@pytest.fixture(scope="module")
def remote(ray_cluster: SimulatedCluster) -> Iterator[tuple[mvm.Sandbox, Any]]:
    """A namespace sandbox on a node other than this driver's (the head), and its node agent."""
    sim = ray_cluster
    with sim.mvm.create("python-3.13", backend="namespace", ttl="10m", node=sim.nodes[1]) as sandbox:
        yield sandbox, sim.mvm.agent(sim.nodes[1])


def relay_status(agent: Any) -> dict[str, Any]:
    return dict(ray.get(agent.relay_status.remote(), timeout=60))


def assert_held_within_bounds(sandbox: mvm.Sandbox, agent: Any, op: str, rss_before: int) -> None:
    """The flooder is blocked before a quarter of its flood, the node agent's relay of
    ``op`` holds at most one window and its memory grew by less than a quarter of the flood
    (an unbounded queue would hold all of it), and another command goes through meanwhile."""
    written = wait_stalled(lambda: int(sandbox.files.read_text("/tmp/written")),
                           "the flooder to block on its full pipe", settle=1.5, timeout=120)
    assert written < FLOOD_MIB // 4, f"the flooder wrote {written} of {FLOOD_MIB} MiB with nobody reading"
    status = relay_status(agent)
    relays = [relay for relay in status["relays"] if relay["op"] == op]
    assert len(relays) == 1, status
    assert 0 < relays[0]["peak_bytes"] <= STREAM_WINDOW, relays
    assert status["rss_bytes"] - rss_before < FLOOD_MIB * MIB // 4, (status["rss_bytes"], rss_before)
    assert sandbox.commands.run(["echo", "meanwhile"], timeout_seconds=120).stdout == "meanwhile\n"
    assert int(sandbox.files.read_text("/tmp/written")) == written  # (still held)


def test_a_stalled_remote_output_stream_holds_the_process(remote: tuple[mvm.Sandbox, Any]) -> None:
    sandbox, agent = remote
    process = sandbox.commands.start(["python3", "-c", flood_script(FLOOD_MIB)], stdin=True)
    chunks = process.output()
    assert next(chunks) == ("stdout", "ready\n")  # attached: the flood is let go only now
    rss_before = relay_status(agent)["rss_bytes"]
    process.send_stdin("go\n")
    assert_held_within_bounds(sandbox, agent, "proc.attach", rss_before)
    assert_all_arrived(chunks, FLOOD_MIB)  # every byte, in order
    assert process.wait(timeout=60) == 0
    wait_for(lambda: not relay_status(agent)["relays"], "the node agent to let go of the relay")


def test_a_stalled_remote_on_stdout_callback_holds_the_process(remote: tuple[mvm.Sandbox, Any]) -> None:
    sandbox, agent = remote
    resume = threading.Event()
    digest, received, ready = hashlib.sha256(), [0], []
    outcome: list[Any] = []

    def on_stdout(text: str) -> None:
        if not ready:  # "ready" may come alone or with the first of the flood
            assert text.startswith("ready\n"), text[:20]
            ready.append(True)
            text = text.removeprefix("ready\n")
        if text:
            resume.wait()  # the caller stops taking output once the flood began
            digest.update(text.encode())
            received[0] += len(text.encode())

    def run() -> None:
        try:
            outcome.append(sandbox.commands.run(["python3", "-c", flood_script(FLOOD_MIB)], stdin="go\n",
                                                on_stdout=on_stdout, max_output_bytes=(FLOOD_MIB + 1) * MIB,
                                                timeout_seconds=600))
        except BaseException as exc:
            outcome.append(exc)

    rss_before = relay_status(agent)["rss_bytes"]
    caller = threading.Thread(target=run)
    caller.start()
    try:
        assert_held_within_bounds(sandbox, agent, "exec.run", rss_before)
    finally:
        resume.set()
        caller.join(timeout=600)
    [result] = outcome
    assert isinstance(result, mvm.CommandResult), result
    assert result.exit_code == 0
    assert received[0] == FLOOD_MIB * MIB
    assert digest.hexdigest() == expected_digest(FLOOD_MIB)
    wait_for(lambda: not relay_status(agent)["relays"], "the node agent to let go of the relay")
