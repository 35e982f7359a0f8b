"""``mvm-agent --fd N`` | ``mvm-agent --virtio-port NAME``: run the guest agent.

When the agent is PID 1 (a microVM's init), it forks: PID 1 stays behind as the
agent's keeper (``keeper``: reaps orphans, starts the agent again when it dies); the
agent proper runs in the child, as a child subreaper of everything it starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from . import MAX_AGENT_RESTARTS, files, keeper, system
from .server import Server
from .transport import FdConnector, VirtioConnector

log = logging.getLogger("mvm.agent")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mvm-agent", description="The mvm guest agent.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, metavar="N", help="an inherited, connected stream socket")
    where.add_argument("--virtio-port", metavar="NAME", help="the virtio-serial port with this name")
    parser.add_argument("--restart-fd", type=int, metavar="N",
                        help="with --fd: a socket to the host over which a keeper process starts the agent "
                             "again, on a fresh channel, when it dies (agent/keeper.py)")
    parser.add_argument("--log-level", default=os.environ.get("MVM_AGENT_LOG", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr verbosity (default INFO)")
    return parser.parse_args(argv)


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def _ignore(signum: int, _frame: FrameType | None) -> None:
    log.info("ignoring signal %d", signum)


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    logging.basicConfig(stream=sys.stderr, level=options.log_level,
                        format="mvm-agent[%(process)d] %(levelname)s %(message)s")
    restartable = False  # (a keeper starts a new agent when this one dies)
    if os.getpid() == 1:
        system.prepare_as_init()
        # Over an inherited fd there is no second channel for a second agent: no restart.
        if options.fd is None:
            code = keeper.keep_agent_running(MAX_AGENT_RESTARTS, host=keeper.VirtioHost())
            restartable = True
        else:
            code = keeper.keep_agent_running(0, host=None, agent_only_fds=(options.fd,))
        if code is not None:
            return code
    elif options.fd is not None and options.restart_fd is not None:
        system.become_subreaper()  # the dead agent's orphans come to the keeper, which ends them
        code = keeper.keep_agent_running(MAX_AGENT_RESTARTS, host=keeper.FdHost(options.restart_fd, options.fd))
        if code is not None:
            return code
        restartable = True
    if restartable:
        files.PENDING.enable()  # (and removes the temp files of a dead agent's writes)
    system.become_subreaper()
    os.umask(0o022)
    try:
        os.chdir("/")
    except OSError:
        pass
    if options.fd is not None:
        try:
            connector: FdConnector | VirtioConnector = FdConnector(options.fd)
            os.fstat(options.fd)
        except OSError as exc:
            log.error("--fd %d is not usable: %s", options.fd, exc)
            return 2
    else:
        connector = VirtioConnector(options.virtio_port)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    signal.signal(signal.SIGHUP, _ignore)  # a handler, not SIG_IGN: children must not inherit "ignored"
    log.info("agent ready (pid %d)", os.getpid())
    return Server(connector).serve()


if __name__ == "__main__":
    sys.exit(main())
