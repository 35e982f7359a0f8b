"""What a VM snapshot is made of and how its parts move: the memory image migrated out
of (and into) QEMU over QMP, the facts recorded beside it (``vm.json``), and the check
that a restoring VM matches them.

A snapshot directory holds ``memory.bin`` (QMP ``migrate`` to ``exec:cat``),
``disk.qcow2`` (the disk frozen at the same instant, one qcow2 layer over the
template's read-only base) and ``vm.json`` (what a restore must match). Given a
``memory_sink``, the memory image is migrated to ``exec:<its command>`` instead (the
supervisor's sealer) and never lands in the directory; given a ``memory_source``,
a restore reads it from ``-incoming exec:<its command>`` (the unsealer).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...errors import InvalidArgument, SandboxError
from .deadline import GuestDeadline
from .machine import QMP_TIMEOUT
from .qmp import QmpClient

SNAPSHOT_FORMAT = 1
#: The snapshot's metadata file (beside ``ready.MEMORY_FILE`` and ``ready.DISK_FILE``).
DETAILS_FILE = "vm.json"


def migrate_memory(qmp: QmpClient, uri: str) -> None:
    """Stream the (stopped) guest's memory to ``uri`` and wait until QEMU says it is complete."""
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": 10_000_000_000})
    qmp.execute("migrate", uri=uri)
    deadline = time.monotonic() + QMP_TIMEOUT
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            # QEMU says "completed" a moment before its run state leaves "finish-migrate"
            # (the migration thread's last step); a `cont` in between is refused with
            # "Migration is not finalized yet".
            while qmp.status() == "finish-migrate":
                if time.monotonic() > deadline:
                    raise SandboxError(f"vm: memory snapshot did not finalize within {QMP_TIMEOUT:.0f} s")
                time.sleep(0.002)
            return
        if status in ("failed", "cancelled"):
            raise SandboxError(f"vm: memory snapshot failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            qmp.execute("migrate_cancel")
            raise SandboxError(f"vm: memory snapshot did not finish within {QMP_TIMEOUT:.0f} s")
        time.sleep(0.005)


def await_incoming(qmp: QmpClient, deadline: GuestDeadline) -> str:
    """Wait until QEMU has loaded an incoming memory image; return its run state then."""
    while True:
        status = qmp.status()
        if status not in ("inmigrate", "prelaunch"):
            break
        if deadline.expired():
            raise SandboxError(f"vm: restoring memory did not finish {deadline.describe()}")
        time.sleep(0.003)
    if status not in ("paused", "postmigrate", "running"):
        raise SandboxError(f"vm: restore ended in state {status!r}")
    return status


def check_compatible(mine: dict[str, Any], details: dict[str, Any]) -> None:
    """A snapshot restores only into a VM of the same shape (``mine``: the restoring VM's
    facts under the names ``details`` uses), over the very base disk it was taken on."""
    mismatched = [
        f"{name}: snapshot has {details.get(name)!r}, this sandbox has {value!r}"
        for name, value in mine.items()
        if details.get(name) != value
    ]
    if mismatched:
        hint = ""
        if any(name in ("memory_mb", "vcpus") and details.get(name) != value for name, value in mine.items()):
            hint = "; create it without resources= to take the snapshot's own"
        raise InvalidArgument(
            "snapshot", "was taken by an incompatible VM (" + "; ".join(mismatched) + ")" + hint,
            allowed="a snapshot of the same template, kernel, QEMU, accelerator, cpu and memory",
        )
    base = Path(str(details.get("base_disk", "")))
    try:
        st = base.stat()
    except OSError:
        raise SandboxError(f"vm: the snapshot's base disk {base} is gone (template removed?)") from None
    if (st.st_size, str(st.st_mtime_ns)) != (details.get("base_disk_size"), str(details.get("base_disk_mtime_ns"))):
        raise SandboxError(f"vm: the snapshot's base disk {base} changed since the snapshot was taken")
