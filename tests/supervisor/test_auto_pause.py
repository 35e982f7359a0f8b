"""Auto-pause on idle and the transparent resume (``auto_pause``), on both backends.

Idle is defined in ``mvm/supervisor/idle.py``: no request in flight, no open port
forward or TCP stream, no working request for the period. The tests wait on the
sandbox's state, never on times.
"""

from __future__ import annotations

import json
import threading

import pytest
from waiting import wait_for

import mvm
from mvm import errors
from mvm.backends import PREFERENCE, availability
from mvm.security.audit import log_path, verify

BACKENDS = [name for name in PREFERENCE if availability(name).ok] or ["namespace"]


def _idle_paused(sb: mvm.Sandbox) -> bool:
    info = sb.describe()
    return info.state == "paused" and bool(info.details["paused_by_idle"])


def _audited_ops(sandbox_id: str) -> list[str]:
    return [json.loads(line)["op"] for line in log_path(sandbox_id).read_text().splitlines()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_idle_sandbox_pauses_and_the_next_request_resumes_it_with_nothing_lost(backend: str) -> None:
    with mvm.Sandbox.create(backend=backend, ttl="10m", auto_pause=1) as sb:
        sb.files.write("/tmp/kept.txt", "before the pause")
        # a background process with state in memory: a counter it keeps incrementing
        proc = sb.commands.start(["sh", "-c", "n=0; while true; do n=$((n+1)); echo $n > /tmp/count; sleep 0.1; done"])
        wait_for(lambda: _idle_paused(sb), "the idle sandbox to pause", timeout=120)
        assert sb.describe().details["auto_pause_seconds"] == 1

        # describe() polls above did not wake it; the next working request does, transparently
        assert sb.files.read_text("/tmp/kept.txt") == "before the pause"
        info = sb.describe()
        assert info.state == "running" and info.details["paused_by_idle"] is False
        first = int(sb.files.read_text("/tmp/count"))
        wait_for(lambda: int(sb.files.read_text("/tmp/count")) > first, "the background process to go on")
        assert proc.info().running

        # and again: the second pause and resume lose nothing either
        wait_for(lambda: _idle_paused(sb), "the second idle pause", timeout=120)
        result = sb.commands.run(["cat", "/tmp/kept.txt"])
        assert result.stdout == "before the pause"
        ops = _audited_ops(sb.id)
        assert ops.count("sandbox.auto_pause") == 2 and ops.count("sandbox.auto_resume") == 2
        assert verify(log_path(sb.id), sandbox_id=sb.id).ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_in_flight_or_an_open_forward_keeps_the_sandbox_awake(backend: str) -> None:
    with mvm.Sandbox.create(backend=backend, ttl="10m", auto_pause=1) as sb:
        # a command running for longer than the idle period: the sandbox stays running under it
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: outcome.append(
            sb.commands.run(["sh", "-c", "for i in 1 2 3 4 5 6; do sleep 0.5; done; echo done"])))
        thread.start()
        thread.join(timeout=120)  # frozen under its own request, it would never end
        assert outcome and outcome[0].stdout.strip() == "done"  # type: ignore[attr-defined]
        assert "sandbox.auto_pause" not in _audited_ops(sb.id)

        # an open port forward keeps it awake: a background process's output written after
        # more than the idle period reaches the log (``logs()`` is a quiet read, it does not
        # wake the sandbox nor reset its clock); a paused guest would never write it
        forward = sb.ports.forward(guest_port=8000)
        sb.commands.start(["sh", "-c", "sleep 3; echo tick"])
        wait_for(lambda: any(e.message == "tick" for e in sb.logs() if e.source.startswith("process:")),
                 "the background process's output while a forward is open", timeout=120)
        assert sb.describe().state == "running"
        assert "sandbox.auto_pause" not in _audited_ops(sb.id)
        sb.ports.close(forward)
        wait_for(lambda: _idle_paused(sb), "the pause once the forward is closed", timeout=120)

        # an explicit pause is the caller's: no request resumes it by itself
        sb.commands.run(["true"])
        sb.pause()
        assert sb.describe().details["paused_by_idle"] is False
        with pytest.raises(errors.SandboxPaused):
            sb.commands.run(["true"])
        sb.resume()
        assert sb.commands.run(["echo", "ok"]).stdout.strip() == "ok"


@pytest.mark.parametrize("value", ["soon", 0, -5, True, "5 parsecs"])
def test_a_bad_auto_pause_is_refused_naming_the_field(value: object) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        mvm.Sandbox.create(backend="namespace", auto_pause=value)  # type: ignore[arg-type]
    assert caught.value.field == "auto_pause"
