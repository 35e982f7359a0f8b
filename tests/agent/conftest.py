"""Fixtures: ``agent`` (a connected client of a fresh agent) and ``spawn_agent`` (variants)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest
from agent_harness import AgentClient, AgentProcess, launch


def _stop(started: AgentProcess) -> None:
    try:
        started.sock.shutdown(socket.SHUT_RDWR)  # wakes our reader thread too, unlike close() alone
    except OSError:
        pass
    started.sock.close()
    try:
        started.process.wait(10)
    except subprocess.TimeoutExpired:
        started.process.kill()
        started.process.wait(5)
        raise AssertionError("the agent did not exit within 10 s of its host closing the channel") from None


@pytest.fixture
def spawn_agent() -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def spawn(prefix: list[str] | None = None, command: list[str] | None = None,
              env: dict[str, str] | None = None) -> AgentProcess:
        agent = launch(prefix, command, env)
        started.append(agent)
        return agent

    yield spawn
    for agent in started:
        _stop(agent)


@pytest.fixture
def agent(spawn_agent: Callable[..., AgentProcess]) -> AgentClient:
    return spawn_agent().client()
