"""The supervisor's agent link when the agent dies while it is being attached (a restore's
guest, say): the restart ends that attach at once, naming the restart, and a call meant for
the dead agent is refused at once rather than waiting for the new one. Otherwise the attach
held the guest's one agent port while the restart opened another (docs/reliability.md,
"Agent restart"). Real sockets; the agent's end is scripted."""

from __future__ import annotations

import socket
import threading

import pytest

from mvm import errors
from mvm.protocol import codec
from mvm.protocol.channel import FramedChannel
from mvm.supervisor.agent_link import AgentLink, AgentReplaced

WHY = "the guest agent died and was restarted (restart 1 of at most 3)"


def _in_background(fn) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except Exception as exc:  # (the outcome is the test's to check)
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_restart_during_the_hello_ends_the_attach_at_once_naming_it() -> None:
    host, guest = socket.socketpair()
    link = AgentLink(on_event=lambda frame, generation: None, on_lost=lambda why: None)
    thread, outcome = _in_background(lambda: link.attach(host, timeout=300))
    assert FramedChannel(guest).recv().kind == "hello"  # the supervisor's; the agent (dead) never answers
    generation = link.begin_restart(WHY)
    thread.join(60)  # a hang guard: without the restart ending it, the attach waits its 300 s
    assert not thread.is_alive()
    error = outcome[0]
    assert isinstance(error, errors.SandboxError), error
    assert error.message == f"{WHY} during hello"
    assert error.details["agent_restart"] is True
    assert not link.attached and link.next_generation > generation
    guest.close()


def test_an_attach_after_the_restart_works() -> None:
    link = AgentLink(on_event=lambda frame, generation: None, on_lost=lambda why: None)
    link.begin_restart(WHY)
    host, guest = socket.socketpair()
    threading.Thread(target=lambda: guest.sendall(codec.hello("agent", pid=7)), daemon=True).start()
    assert link.attach(host, timeout=60)["pid"] == 7
    assert link.attached
    link.detach()
    guest.close()


def test_a_call_for_the_dead_agent_is_refused_at_once_while_it_restarts() -> None:
    host, guest = socket.socketpair()
    link = AgentLink(on_event=lambda frame, generation: None, on_lost=lambda why: None)
    threading.Thread(target=lambda: guest.sendall(codec.hello("agent", pid=1)), daemon=True).start()
    link.attach(host, timeout=60)
    dead = link.generation
    link.begin_restart(WHY)
    # (a call for any agent waits for the new one's hello; one for the dead agent cannot be served)
    thread, outcome = _in_background(lambda: link.call("agent.configure", {}, generation=dead, timeout=300))
    thread.join(30)  # a hang guard: it used to wait the restart's 60 s first
    assert not thread.is_alive()
    assert isinstance(outcome[0], AgentReplaced), outcome
    with pytest.raises(AgentReplaced):
        link.submit("proc.signal", {"pid": 1}, generation=dead)
    link.detach()
    guest.close()
