"""Ending pool members from outside their supervisor: whether a member still runs, and
destroying one — by a creator whose claim failed (``claim.py``), by the owner's refill
pruning a dead member or closing the pool (``mvm/sdk/pool.py``).

A member runs while the process its directory's owner stamp names does: pid *and*
start time, the rule discovery uses (``supervisor.state.owner_alive``), so a supervisor
that died and whose pid another process got since is not taken for a live member, and
that other process is never waited for nor killed.
"""

from __future__ import annotations

import time

from .. import errors
from ..osutil import stamp_alive
from ..paths import sandboxes_dir
from ..supervisor.client import SupervisorClient
from ..supervisor.state import CONTROL_SOCKET, load_record, owner_alive, owner_stamp, reap

#: How long a member's supervisor gets to destroy it when asked, and then to exit.
DESTROY_TIMEOUT = 60
EXIT_TIMEOUT = 30


def member_alive(sandbox_id: str) -> bool:
    """Whether the member's supervisor (or, while it starts, its launcher) still runs."""
    return owner_alive(sandboxes_dir() / sandbox_id)


def destroy_over(client: SupervisorClient) -> None:
    """Ask a member's supervisor to destroy it, then close the connection. A member
    already gone or going (its TTL ran out, its pool closed) is fine: nothing is raised."""
    try:
        client.call("sandbox.destroy", timeout=DESTROY_TIMEOUT)
    except errors.MvmError:
        pass
    finally:
        client.close()


def destroy_member(sandbox_id: str) -> None:
    """End a member this process took out of its pool, and return once it is gone (its
    supervisor may be ending it already: the pool closed, or its TTL ran out)."""
    directory = sandboxes_dir() / sandbox_id
    stamp = owner_stamp(directory)
    try:
        client = SupervisorClient(directory / CONTROL_SOCKET)
    except errors.MvmError:
        client = None
    if client is not None:
        destroy_over(client)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while stamp_alive(stamp) and time.monotonic() < deadline:
        time.sleep(0.02)
    if directory.exists():
        reap(directory, load_record(directory))
