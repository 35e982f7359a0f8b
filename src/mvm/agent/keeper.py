"""The agent's keeper: it starts the agent again when it dies. In a microVM the keeper is
PID 1; in a namespace sandbox it is the process bwrap starts (``--restart-fd``).

The keeper forks the agent and reaps every orphan. When the agent dies it SIGKILLs every
other process (the processes the dead agent ran have nobody left to report them; the
host reports them ended), tells the host, waits until the host has dropped the dead
agent's connection, and then forks a new agent. That happens at most
``MAX_AGENT_RESTARTS`` times; an agent ending with code 0 (SIGTERM, its host hung up) is
not restarted. After that the keeper ends along with the agent: in a VM PID 1 exits, the
kernel panics and the VM stops; in a namespace sandbox bwrap ends with the keeper.

The host is told over a channel of its own, one ASCII line each way. The guest sends
``agent-ended N`` (N: the restart about to happen); the host answers ``go N`` once it has
closed the dead agent's connection. In a VM the channel is a virtio-serial port
(``INIT_PORT``, ``VirtioHost``), and QEMU throws away what the dead agent had queued for
the closed connection. In a namespace sandbox it is an inherited socket (``FdHost``),
which then carries the new agent's channel too: a fresh socketpair, one end handed to the
host (``channel N`` with the descriptor), the other put on the agent's ``--fd``. (The
keeper holds the dead agent's channel open until then, so the host reads no EOF on it
before it has heard why.) Either way the new agent starts on a clean stream: a frame the
dead agent half wrote can never be read as part of the new agent's.

QEMU's own port events (``VSERPORT_CHANGE``) would not do: QEMU rate-limits them to one
per second and keeps only the last, so a close followed by an open is reported as the
open alone.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from typing import Protocol

from .reaper import exit_code_of
from .transport import lookup_virtio_port

log = logging.getLogger("mvm.agent")

#: The name of the keeper's virtio-serial port (the agent's is given by ``--virtio-port``).
INIT_PORT = "mvm-init"
#: How long the keeper waits for the host's ``go`` before it starts the new agent anyway.
HOST_WAIT = 10.0
#: Longest line either side sends; a longer one is not a message.
MAX_LINE = 64
#: How long the keeper waits for the dead agent's processes to go after SIGKILL.
END_WAIT = 5.0


def ended_line(restart: int) -> bytes:
    return f"agent-ended {restart}\n".encode()


def go_line(restart: int) -> bytes:
    return f"go {restart}\n".encode()


def channel_line(restart: int) -> bytes:
    return f"channel {restart}\n".encode()


class Host(Protocol):
    def agent_ended(self, restart: int) -> bool:
        """Tell the host; wait for its ``go``; False when the host is gone (no restart then)."""
        ...

    def close_in_agent(self) -> None:
        """In a new agent: drop what is the keeper's alone."""
        ...


def keep_agent_running(max_restarts: int, *, host: Host | None,
                       agent_only_fds: tuple[int, ...] = ()) -> int | None:
    """Fork the agent; start it again when it dies, at most ``max_restarts`` times.

    Returns ``None`` in each agent child (it goes on to be the agent). In the keeper it
    returns the last agent's exit code, once that agent died with no restarts left, or
    ended by itself with code 0 (told to: SIGTERM, or its host hung up).
    ``agent_only_fds`` are closed in the keeper once the first agent has them (its channel).
    """
    restarts = 0
    while True:
        child = os.fork()
        if child == 0:
            if host is not None:
                host.close_in_agent()
            return None
        for fd in agent_only_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        agent_only_fds = ()
        code, signum = _wait_for(child)
        how = f"signal {signum}" if signum else f"code {code}"
        if code == 0:
            log.info("the agent (pid %d) ended", child)
            return code
        if restarts >= max_restarts or host is None:
            log.error("the agent (pid %d) ended with %s; it was restarted %d times, giving up", child, how, restarts)
            return code
        restarts += 1
        log.error("the agent (pid %d) ended with %s; ending its processes and starting it again (%d of %d)",
                  child, how, restarts, max_restarts)
        _end_all_other_processes()
        if not host.agent_ended(restarts):
            log.error("the host is gone: the agent is not started again")
            return code


def _wait_for(child: int) -> tuple[int, int | None]:
    """Reap until ``child`` is among the reaped; its ``(exit_code, signal)``."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1, None
        except InterruptedError:
            continue
        if pid == child:
            return exit_code_of(status)


def _end_all_other_processes() -> None:
    """SIGKILL every process but this one (``kill(-1)`` spares the caller and PID 1) and reap
    them. Bounded: a process that cannot be killed is logged and left."""
    deadline = time.monotonic() + END_WAIT
    while True:
        try:
            os.kill(-1, signal.SIGKILL)  # again each round: nothing forked in between survives
        except ProcessLookupError:
            pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        if time.monotonic() > deadline:
            log.warning("some processes of the dead agent did not end within %.0f s", END_WAIT)
            return
        time.sleep(0.01)


class VirtioHost:
    """A microVM's host, over the virtio-serial port ``INIT_PORT``."""

    def close_in_agent(self) -> None:
        pass  # the keeper opens the port only while it talks

    def agent_ended(self, restart: int) -> bool:
        _tell_over_virtio(restart)
        return True  # (a VM whose host is gone is gone with it)


class FdHost:
    """A namespace sandbox's host, over an inherited socket (``--restart-fd``); the agent's
    channel is the keeper's ``agent_fd`` (``--fd``), replaced by a fresh one for each new agent."""

    def __init__(self, restart_fd: int, agent_fd: int):
        os.set_inheritable(restart_fd, False)  # not for the commands the agent starts
        self._sock = socket.socket(fileno=restart_fd)
        self._agent_fd = agent_fd

    def close_in_agent(self) -> None:
        self._sock.close()

    def agent_ended(self, restart: int) -> bool:
        try:
            self._sock.settimeout(HOST_WAIT)
            self._sock.sendall(ended_line(restart))
            received = b""
            while go_line(restart) not in received:
                chunk = self._sock.recv(MAX_LINE)
                if not chunk:
                    return False
                received = (received + chunk)[-MAX_LINE:]
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                socket.send_fds(self._sock, [channel_line(restart)], [theirs.fileno()])
                os.dup2(ours.fileno(), self._agent_fd)  # (closes our copy of the dead agent's channel)
            finally:
                ours.close()
                theirs.close()
        except OSError as exc:  # a timeout included: a host that does not answer is gone
            log.warning("telling the host failed: %s", exc)
            return False
        return True


def _tell_over_virtio(restart: int) -> None:
    """``agent-ended N`` on ``INIT_PORT``; wait (at most ``HOST_WAIT``) for ``go N``."""
    path = lookup_virtio_port(INIT_PORT)
    if path is None:
        log.warning("no virtio-serial port %r: starting the agent without telling the host", INIT_PORT)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        log.warning("cannot open %s (%s): starting the agent without telling the host", path, exc)
        return
    deadline = time.monotonic() + HOST_WAIT
    try:
        os.write(fd, ended_line(restart))
        received = b""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while go_line(restart) not in received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("the host did not answer %r within %.0f s", ended_line(restart), HOST_WAIT)
                return
            poller.poll(int(min(remaining, 0.1) * 1000))
            try:
                chunk = os.read(fd, MAX_LINE)
            except BlockingIOError:
                continue
            if not chunk:  # no host connected (EOF on a virtio port): it cannot answer yet
                time.sleep(0.05)
                continue
            received = (received + chunk)[-MAX_LINE:]
    except OSError as exc:
        log.warning("telling the host failed (%s): starting the agent anyway", exc)
    finally:
        os.close(fd)
