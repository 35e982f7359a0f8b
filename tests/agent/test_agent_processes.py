"""proc.*: spawning, output and exit events, stdin, signals, reaping."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

from agent_harness import CANARY, AgentClient, pid_exists, wait_until
from waiting import wait_stalled

from mvm.protocol import codec
from mvm.protocol.codec import CHUNK_SIZE


def test_output_events_arrive_in_order_and_exit_comes_last(agent: AgentClient) -> None:
    done = agent.run(["sh", "-c", "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done; exit 7"])
    assert done.stdout == b"out1\nout2\nout3\nout4\nout5\n"
    assert done.stderr == b"err1\nerr2\nerr3\nerr4\nerr5\n"
    assert done.exit_code == 7 and done.signal is None
    exit_event = done.events[-1].header
    assert exit_event["event"] == "proc.exit" and exit_event["ended_at"] >= time.time() - 60


def test_start_answers_with_pid_and_start_time_before_any_event(agent: AgentClient) -> None:
    before = time.time()
    ident = agent.send_request("proc.start", {"argv": ["echo", "hi"]})
    result = agent.response(ident).header["result"]
    assert before - 1 <= result["started_at"] <= time.time() + 1
    assert agent.wait_exit(result["pid"]).stdout == b"hi\n"


def test_exit_codes_are_reported(agent: AgentClient) -> None:
    assert agent.run(["true"]).exit_code == 0
    assert agent.run(["false"]).exit_code == 1
    assert agent.run(["sh", "-c", "exit 255"]).exit_code == 255


def test_a_process_killed_by_a_signal_reports_128_plus_the_signal(agent: AgentClient) -> None:
    pid = agent.start(["sleep", "30"])
    assert agent.call("proc.signal", pid=pid, signal="TERM")["signalled"] == 1
    done = agent.wait_exit(pid)
    assert (done.exit_code, done.signal) == (128 + signal.SIGTERM, signal.SIGTERM)
    done = agent.run(["sh", "-c", "kill -KILL $$"])
    assert (done.exit_code, done.signal) == (137, 9)


def test_signals_are_accepted_by_name_or_number(agent: AgentClient) -> None:
    for spec, number in [("INT", 2), ("SIGHUP", 1), (15, 15), ("kill", 9)]:
        pid = agent.start(["sleep", "30"])
        agent.call("proc.signal", pid=pid, signal=spec)
        assert agent.wait_exit(pid).signal == number


def test_an_unknown_signal_is_InvalidArgument_listing_the_allowed_ones(agent: AgentClient) -> None:
    pid = agent.start(["sleep", "30"])
    error = agent.error("proc.signal", pid=pid, signal="FREEZE")
    assert error["type"] == "InvalidArgument" and error["field"] == "signal"
    assert "TERM" in error["allowed"] and "KILL" in error["allowed"]
    agent.call("proc.signal", pid=pid, signal="KILL")


def test_signalling_an_unknown_pid_is_ProcessNotFound(agent: AgentClient) -> None:
    error = agent.error("proc.signal", pid=os.getpid(), signal="KILL")
    assert error["type"] == "ProcessNotFound" and error["pid"] == os.getpid()
    assert agent.error("proc.stdin", pid=999_999_999)["type"] == "ProcessNotFound"


def test_signalling_a_finished_process_is_harmless(agent: AgentClient) -> None:
    done = agent.run(["true"])
    result = agent.call("proc.signal", pid=done.pid, signal="KILL", group=True)
    assert result == {"signalled": 0, "running": False}


def test_the_host_environment_does_not_leak_into_processes(agent: AgentClient) -> None:
    assert os.environ.get(CANARY) is None  # the canary lives only in the agent's own environment
    with open(f"/proc/{agent.process.pid}/environ", "rb") as handle:
        assert CANARY.encode() in handle.read(), "precondition: the agent itself has the canary"
    env = dict(line.split("=", 1) for line in agent.run(["env"]).stdout.decode().splitlines())
    assert CANARY not in env
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                   "LANG": "C.UTF-8"}


def test_the_request_env_is_added_to_the_base_env(agent: AgentClient) -> None:
    out = agent.run(["sh", "-c", 'echo "$GREETING|$HOME"'], env={"GREETING": "hi there", "HOME": "/tmp"}).stdout
    assert out == b"hi there|/tmp\n"


def test_the_request_path_is_used_to_find_the_command(agent: AgentClient, tmp_path: Path) -> None:
    tool = tmp_path / "only-here"
    tool.write_text("#!/bin/sh\necho found me\n")
    tool.chmod(0o755)
    assert agent.error("proc.start", argv=["only-here"])["type"] == "FileNotFound"
    assert agent.run(["only-here"], env={"PATH": f"{tmp_path}:/usr/bin:/bin"}).stdout == b"found me\n"


def test_processes_run_in_the_requested_directory_defaulting_to_root(agent: AgentClient, tmp_path: Path) -> None:
    assert agent.run(["pwd"]).stdout == b"/\n"
    assert agent.run(["pwd"], cwd=str(tmp_path)).stdout == f"{tmp_path}\n".encode()
    (tmp_path / "script").write_text("#!/bin/sh\necho relative\n")
    (tmp_path / "script").chmod(0o755)
    assert agent.run(["./script"], cwd=str(tmp_path)).stdout == b"relative\n"


def test_a_missing_working_directory_is_FileNotFound_naming_it(agent: AgentClient) -> None:
    error = agent.error("proc.start", argv=["true"], cwd="/no/such/dir")
    assert error["type"] == "FileNotFound" and error["path"] == "/no/such/dir"
    assert "/no/such/dir" in error["message"]
    error = agent.error("proc.start", argv=["true"], cwd="/etc/hostname")
    assert error["type"] == "NotADirectory"
    assert agent.error("proc.start", argv=["true"], cwd="")["field"] == "cwd"
    # a relative cwd is taken from the default working directory "/"
    assert agent.error("proc.start", argv=["true"], cwd="no/such/rel")["path"] == "/no/such/rel"


def test_a_staged_stdin_is_read_from_its_file_which_goes(agent: AgentClient, tmp_path: Path) -> None:
    staged = tmp_path / "stdin"
    staged.write_bytes(b"staged input\n")
    assert agent.run(["cat"], stdin_path=str(staged)).stdout == b"staged input\n"
    assert not staged.exists()


def test_a_staged_stdin_that_is_no_regular_file_is_refused_without_waiting(agent: AgentClient, tmp_path: Path) -> None:
    """A FIFO nobody writes would block its open: refused at once, nothing taken."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    error = agent.error("proc.start", argv=["cat"], stdin_path=str(fifo))
    assert error["type"] == "InvalidArgument" and error["field"] == "stdin_path" and str(fifo) in error["message"]
    assert fifo.exists()  # (not taken: nothing removed)
    assert agent.error("proc.start", argv=["true"], stdin_path=str(tmp_path / "missing"))["type"] == "FileNotFound"
    assert agent.run(["echo", "still answering"]).stdout == b"still answering\n"


def test_an_unknown_command_is_FileNotFound_naming_the_command(agent: AgentClient) -> None:
    error = agent.error("proc.start", argv=["definitely-not-a-command", "--flag"])
    assert error["type"] == "FileNotFound"
    assert "definitely-not-a-command" in error["message"]
    assert agent.error("proc.start", argv=["/no/such/binary"])["type"] == "FileNotFound"


def test_a_file_without_execute_permission_is_PermissionDenied(agent: AgentClient, tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho no\n")
    script.chmod(0o644)
    error = agent.error("proc.start", argv=[str(script)])
    assert error["type"] == "PermissionDenied" and str(script) in error["message"]


def test_each_process_leads_its_own_session_and_process_group(agent: AgentClient) -> None:
    done = agent.run(["sh", "-c", "cut -d' ' -f1,5,6 /proc/$$/stat"])
    pid, pgrp, session = done.stdout.split()
    assert int(pid) == int(pgrp) == int(session) == done.pid


def test_stdin_is_a_pipe_when_asked_for(agent: AgentClient) -> None:
    data = os.urandom(3 * CHUNK_SIZE + 17)
    pid = agent.start(["sha256sum"], stdin=True)
    for offset in range(0, len(data), CHUNK_SIZE):
        result = agent.call("proc.stdin", data[offset : offset + CHUNK_SIZE], pid=pid)
        assert result == {"written": len(data[offset : offset + CHUNK_SIZE]), "closed": False}
    agent.call("proc.stdin", pid=pid, eof=True)
    assert agent.wait_exit(pid).stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_stdin_is_dev_null_when_not_asked_for(agent: AgentClient) -> None:
    done = agent.run(["sh", "-c", "readlink /proc/self/fd/0; cat"])
    assert done.stdout == b"/dev/null\n" and done.exit_code == 0
    error = agent.error("proc.stdin", b"x", pid=done.pid)
    assert error["type"] == "InvalidState"


def test_stdin_written_after_the_reader_is_gone_is_answered_as_closed(agent: AgentClient) -> None:
    done = agent.run(["true"], stdin=b"ignored")
    result = agent.call("proc.stdin", b"late", pid=done.pid)
    assert result == {"written": 0, "closed": True}


def test_large_output_is_split_into_bounded_events_without_loss(agent: AgentClient) -> None:
    size = 5 * CHUNK_SIZE + 123
    done = agent.run(["head", "-c", str(size), "/dev/urandom"])
    assert len(done.stdout) == size
    assert all(len(e.payload) <= CHUNK_SIZE for e in done.events)


def test_exit_waits_for_the_output_to_end(agent: AgentClient) -> None:
    # The shell exits at once; its child keeps writing to the inherited stdout for a while.
    done = agent.run(["sh", "-c", "(sleep 0.1; echo late) & echo early"])
    assert done.stdout == b"early\nlate\n"


def test_exit_is_reported_soon_after_the_reap_even_if_a_descendant_holds_the_pipes(agent: AgentClient) -> None:
    done = agent.run(["sh", "-c", "sleep 300 & echo $!"], timeout=60)
    assert done.exit_code == 0
    lingering = int(done.stdout)
    assert pid_exists(lingering)  # reported while the pipes' last holder still runs
    agent.call("proc.signal", pid=done.pid, signal="KILL", group=True)
    assert wait_until(lambda: not pid_exists(lingering))


def test_group_kill_leaves_no_descendant_running(agent: AgentClient) -> None:
    script = "setsid sh -c 'sleep 300 & sleep 300' & echo $!; (sleep 300 &); sleep 300"
    pid = agent.start(["sh", "-c", script])
    assert wait_until(lambda: agent.events_for(pid))
    escaped = int(agent.events_for(pid)[0].payload)
    assert wait_until(lambda: len(_descendants_of(agent.process.pid)) >= 6)
    family = _descendants_of(agent.process.pid)
    assert escaped in family
    assert agent.call("proc.signal", pid=pid, signal="KILL", group=True)["signalled"] >= 6
    done = agent.wait_exit(pid)
    assert done.signal == signal.SIGKILL
    assert wait_until(lambda: not any(pid_exists(p) for p in family)), "something survived the group kill"


def test_group_kill_reaches_a_daemon_left_behind_by_a_finished_process(agent: AgentClient) -> None:
    done = agent.run(["sh", "-c", "setsid sleep 300 & echo $!"])  # exits, leaving a setsid'd daemon
    daemon = int(done.stdout)
    assert done.exit_code == 0 and pid_exists(daemon)
    agent.call("proc.signal", pid=done.pid, signal="KILL", group=True)
    assert wait_until(lambda: not pid_exists(daemon))


def test_group_kill_stops_a_fork_loop(agent: AgentClient) -> None:
    pid = agent.start(["sh", "-c", "while true; do sleep 30 & done"])
    assert wait_until(lambda: len(_descendants_of(agent.process.pid)) >= 8)  # the loop is forking
    agent.call("proc.signal", pid=pid, signal="KILL", group=True)
    agent.wait_exit(pid)
    assert wait_until(lambda: not _descendants_of(agent.process.pid)), "fork loop members survived"


def test_non_group_signal_reaches_only_the_process_itself(agent: AgentClient) -> None:
    pid = agent.start(["sh", "-c", "sleep 300 & echo $!; wait"])
    assert wait_until(lambda: agent.events_for(pid))
    child = int(agent.events_for(pid)[0].payload)
    agent.call("proc.signal", pid=pid, signal="KILL")
    assert wait_until(lambda: not pid_exists(pid))
    assert pid_exists(child)
    agent.call("proc.signal", pid=pid, signal="KILL", group=True)
    assert wait_until(lambda: not pid_exists(child))


def test_orphans_are_adopted_and_reaped_by_the_agent(agent: AgentClient) -> None:
    done = agent.run(["sh", "-c", "(sleep 0.5 >/dev/null 2>&1 & echo $!)"])
    orphan = int(done.stdout)
    assert _ppid(orphan) == agent.process.pid, "the agent is the subreaper of its processes' orphans"
    assert wait_until(lambda: not pid_exists(orphan), timeout=3)
    assert wait_until(lambda: not _zombie_children(agent.process.pid), timeout=3)
    assert wait_until(lambda: _ppid(orphan) is None, timeout=3), "the orphan was not reaped"


def test_proc_list_shows_running_and_finished_processes(agent: AgentClient) -> None:
    finished = agent.run(["sh", "-c", "exit 4"])
    running = agent.start(["sleep", "30"])
    listed = {p["pid"]: p for p in agent.call("proc.list")["processes"]}
    assert listed[finished.pid]["running"] is False and listed[finished.pid]["exit_code"] == 4
    assert listed[finished.pid]["argv"] == ["sh", "-c", "exit 4"]
    assert listed[running]["running"] is True and listed[running]["exit_code"] is None
    assert listed[running]["started_at"] > 0
    agent.call("proc.signal", pid=running, signal="KILL")


def test_proc_list_stays_within_a_frame_by_shortening_long_command_lines(agent: AgentClient) -> None:
    pids = [agent.run(["sh", "-c", "exit 0", "x" * 15_000, str(n)]).pid for n in range(5)]
    result = agent.call("proc.list")
    assert result["truncated"] is True
    listed = {p["pid"]: p for p in result["processes"]}
    assert set(pids) <= set(listed)
    assert all(listed[pid]["argv_truncated"] and len(listed[pid]["argv"][3]) == 128 for pid in pids)


def test_many_concurrent_processes_each_get_their_own_output_and_exit(agent: AgentClient) -> None:
    pids = {agent.start(["sh", "-c", f"echo {n}; exit {n}"]): n for n in range(30)}
    for pid, n in pids.items():
        done = agent.wait_exit(pid)
        assert (done.stdout, done.exit_code) == (f"{n}\n".encode(), n)


def test_a_stopped_process_still_obeys_a_group_terminate(agent: AgentClient) -> None:
    pid = agent.start(["sh", "-c", "kill -STOP $$"])
    assert wait_until(lambda: _state(pid) == "T")
    agent.call("proc.signal", pid=pid, signal="TERM", group=True)
    assert agent.wait_exit(pid).signal == signal.SIGTERM


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _zombie_children(parent: int) -> list[int]:
    zombies = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields and fields[0] == "Z" and int(fields[1]) == parent:
                zombies.append(int(name))
    return zombies


def _descendants_of(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(name))
    found: set[int] = set()
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def _output_bytes(agent: AgentClient, pid: int) -> int:
    return sum(len(e.payload) for e in agent.events_for(pid) if e.header["event"] == "proc.output")


def test_output_credit_holds_a_process_and_its_exit_until_granted_and_nothing_is_lost(agent: AgentClient) -> None:
    window = 16 * 1024
    # 48 KiB fit in the pipe: the process writes them all and exits, a third sent, the rest in its pipe
    pid = agent.start(["sh", "-c", "head -c 49152 /dev/zero | tr '\\0' y; exit 3"], output_window=window)
    assert wait_until(lambda: not next(p for p in agent.call("proc.list")["processes"]
                                       if p["pid"] == pid)["running"], timeout=30)  # the writer was reaped
    # past LINGER_SECONDS after the reap: what waits for credit in its pipe is kept, not dropped
    assert wait_stalled(lambda: _output_bytes(agent, pid), "the agent to stop at the credit", settle=0.5) == window
    assert not [e for e in agent.events_for(pid) if e.header["event"] == "proc.exit"]
    assert agent.run(["echo", "other"]).stdout == b"other\n"  # other processes flow meanwhile
    agent.channel.send_raw(codec.event("proc.window", pid=pid, bytes=window))
    assert wait_until(lambda: _output_bytes(agent, pid) == 2 * window, timeout=30)  # just what was granted
    agent.channel.send_raw(codec.event("proc.window", pid=pid, bytes=window))
    done = agent.wait_exit(pid)
    assert done.stdout == b"y" * 49152 and done.exit_code == 3


def test_a_stalled_process_blocks_on_its_pipe_and_goes_on_when_granted(agent: AgentClient) -> None:
    pid = agent.start(["sh", "-c", "head -c 8388608 /dev/zero | tr '\\0' y"], output_window=256 * 1024)
    assert wait_stalled(lambda: _output_bytes(agent, pid), "the agent to stop at the credit") == 256 * 1024
    assert next(p for p in agent.call("proc.list")["processes"] if p["pid"] == pid)["running"]  # blocked, not done
    agent.channel.send_raw(codec.event("proc.window", pid=pid, bytes=8 * 1024 * 1024))
    done = agent.wait_exit(pid, timeout=60)
    assert done.stdout == b"y" * 8388608 and done.exit_code == 0
