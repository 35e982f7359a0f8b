"""The host end of the agent keeper's socket (``agent/keeper.py``, ``FdHost``).

The keeper runs inside the sandbox and is no more trusted than the agent. What it
sends is bounded: lines of at most ``MAX_LINE`` bytes, at most one descriptor per
message, and that descriptor has to be a connected AF_UNIX stream socket. Anything else
closes the link, and after that an agent death ends the sandbox as it did before
restarts existed.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

from ...agent import keeper
from ...errors import SandboxError


class KeeperLink:
    """Reads ``agent-ended N`` on its own thread and calls ``on_agent_ended`` there. The
    callback takes the new agent's channel with ``new_channel`` (``go N``, then ``channel N``
    and its socket). When the callback does not take it, the channel is taken and closed:
    that new agent then finds no host and ends."""

    def __init__(self, sock: socket.socket, on_agent_ended: Callable[[], None]):
        self._sock = sock
        self._on_agent_ended = on_agent_ended
        self._buffer = b""
        self._fds: list[int] = []
        self._waiting: int | None = None

    def start(self) -> None:
        threading.Thread(target=self._serve, daemon=True, name="mvm-ns-keeper").start()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _serve(self) -> None:
        try:
            while True:
                words = self._line().split()
                if len(words) != 2 or words[0] != b"agent-ended" or not words[1].isdigit():
                    return  # not the keeper's language: stop listening
                self._waiting = int(words[1])
                self._on_agent_ended()
                if self._waiting is not None:
                    self.new_channel().close()
        except (OSError, SandboxError):
            return
        finally:
            self._sock.close()
            for fd in self._fds:
                os.close(fd)

    def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            data, fds, flags, _ = socket.recv_fds(self._sock, keeper.MAX_LINE, 1)
            self._fds.extend(fds)
            if not data or flags & socket.MSG_CTRUNC or len(self._fds) > 1:
                raise SandboxError("the agent keeper's link ended")
            self._buffer += data
            if len(self._buffer) > keeper.MAX_LINE:
                raise SandboxError("the agent keeper sent an overlong line")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def new_channel(self) -> socket.socket:
        """Let the keeper start the new agent (``go N``); its channel (``channel N``)."""
        restart, self._waiting = self._waiting, None
        if restart is None:
            raise SandboxError("no agent restart is waiting for its channel")
        self._sock.settimeout(keeper.HOST_WAIT * 2)
        try:
            self._sock.sendall(keeper.go_line(restart))
            if self._line() + b"\n" != keeper.channel_line(restart) or len(self._fds) != 1:
                raise SandboxError(f"the agent keeper did not send the channel of restart {restart}")
        except TimeoutError:
            raise SandboxError(f"the agent keeper did not send the channel of restart {restart}") from None
        finally:
            self._sock.settimeout(None)
        fd = self._fds.pop()
        try:
            channel = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise SandboxError("the agent keeper sent something other than a socket") from None
        if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_STREAM:
            channel.close()
            raise SandboxError("the agent keeper sent something other than a socketpair end")
        return channel
