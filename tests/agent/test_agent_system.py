"""agent.configure: the base environment, hostname, clock and entropy."""

from __future__ import annotations

import socket
import time

import pytest
from agent_harness import AgentClient, unshare_available

NAMESPACED = ["unshare", "--user", "--map-root-user", "--uts"]


def test_configure_sets_the_base_env_of_later_processes(agent: AgentClient) -> None:
    result = agent.call("agent.configure", env={"HTTP_PROXY": "http://127.0.0.1:3128", "LANG": None})
    assert result["env_keys"] == ["HOME", "HTTP_PROXY", "PATH"]
    env = dict(line.split("=", 1) for line in agent.run(["env"]).stdout.decode().splitlines())
    assert env["HTTP_PROXY"] == "http://127.0.0.1:3128"
    assert "LANG" not in env, "a null value removes a default"
    assert env["PATH"].startswith("/usr/local/sbin")
    out = agent.run(["sh", "-c", 'echo "$HTTP_PROXY"'], env={"HTTP_PROXY": "override"}).stdout
    assert out == b"override\n", "the request env wins over the base env"


def test_a_later_configure_replaces_the_earlier_env(agent: AgentClient) -> None:
    agent.call("agent.configure", env={"FIRST": "1"})
    agent.call("agent.configure", env={"SECOND": "2"})
    env = agent.run(["env"]).stdout.decode()
    assert "SECOND=2" in env and "FIRST" not in env
    agent.call("agent.configure", entropy_hex="00")  # no env: the base env stays as it is
    assert "SECOND=2" in agent.run(["env"]).stdout.decode()


def test_entropy_is_mixed_into_the_guest_rng(agent: AgentClient) -> None:
    assert agent.call("agent.configure", entropy_hex="a5" * 32) == {"entropy_mixed": True}


@pytest.mark.parametrize("args, field", [
    ({"env": {"BAD=NAME": "x"}}, "env"),
    ({"env": ["A=1"]}, "env"),
    ({"env": {"A": 1}}, "env"),
    ({"clock_epoch": "now"}, "clock_epoch"),
    ({"clock_epoch": -5}, "clock_epoch"),
    ({"entropy_hex": "xyz"}, "entropy_hex"),
    ({"hostname": "not a host name!"}, "hostname"),
    ({"hostname": "a" * 64}, "hostname"),
    ({"max_processes": 0}, "max_processes"),
    ({"max_processes": "many"}, "max_processes"),
])
def test_bad_configure_arguments_name_the_field_and_change_nothing(agent: AgentClient, args: dict,
                                                                   field: str) -> None:
    error = agent.error("agent.configure", **{"env": {"MARK": "set"}, **args})
    assert error["type"] == "InvalidArgument" and error["field"] == field
    assert b"MARK" not in agent.run(["env"]).stdout, "a rejected configure applies nothing"
    assert agent.call("agent.info")["hostname"] == socket.gethostname()


@pytest.mark.skipif(not unshare_available(*NAMESPACED), reason="needs unprivileged user and UTS namespaces")
def test_in_a_namespace_sandbox_hostname_is_set_and_the_clock_is_left_alone(spawn_agent) -> None:
    agent = spawn_agent(prefix=NAMESPACED).client()
    before = time.time()
    result = agent.call("agent.configure", hostname="sandbox-1", clock_epoch=1_000_000_000.0, entropy_hex="ff")
    assert result == {"hostname_set": True, "clock_set": False, "entropy_mixed": True}
    assert agent.call("agent.info")["hostname"] == "sandbox-1"
    assert agent.run(["hostname"]).stdout == b"sandbox-1\n"
    assert time.time() >= before, "the host clock was not touched"
    assert socket.gethostname() != "sandbox-1"
