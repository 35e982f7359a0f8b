"""A sandbox's on-disk record (``state.json``) and discovery of sandboxes by name or id.

``config.json`` is written once by the creator (never a secret value in it);
``state.json`` is rewritten atomically by the supervisor on every state change.
A sandbox whose supervisor died is detected here and cleaned by ``reap``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from .. import errors
from ..osutil import pid_alive
from ..paths import sandboxes_dir
from ..spec import validate_name as validate_name  # defined with the rest of the sandbox spec

STATES = ("creating", "pooled", "running", "paused", "stopped", "destroyed", "error")
CONTROL_SOCKET = "control.sock"


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(5)


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def load_record(directory: Path) -> dict[str, Any] | None:
    """The newest view of a sandbox: state.json if the supervisor wrote one, else config.json."""
    for name in ("state.json", "config.json"):
        try:
            return read_json(directory / name)
        except (FileNotFoundError, ValueError, json.JSONDecodeError):
            continue
    return None


def supervisor_alive(directory: Path, record: dict[str, Any]) -> bool:
    if not pid_alive(record.get("supervisor_pid")):
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(str(directory / CONTROL_SOCKET))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def reap(directory: Path, record: dict[str, Any] | None) -> None:
    """Remove a sandbox whose supervisor is gone: its backend leftovers, then its directory."""
    from ..backends import get_backend  # late: keeps the CLI's `ls` import light

    if record:
        pid = record.get("supervisor_pid")
        if isinstance(pid, int) and pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        backend_name = record.get("backend")
        if backend_name:
            try:
                get_backend(backend_name).cleanup_orphan(directory)
            except errors.BackendUnavailable:
                pass
        # a supervisor killed mid snapshot save / restore left a staging or unsealed directory
        from ..snapshots import SnapshotStore

        SnapshotStore().sweep_leftovers()
    shutil.rmtree(directory, ignore_errors=True)


def unclaimed(record: dict[str, Any]) -> bool:
    """A warm pool's member nobody claimed yet: not a sandbox anyone created (mvm/pooling)."""
    return bool(record.get("pool")) and record.get("state", "creating") in ("creating", "pooled")


def list_sandboxes(*, clean_dead: bool = True, pooled: bool = False) -> list[dict[str, Any]]:
    """Every live sandbox's record (with ``pooled``, also unclaimed pool members); dead
    ones (supervisor gone) are cleaned on the way."""
    found = []
    for directory in sorted(sandboxes_dir().iterdir()):
        if not directory.is_dir():
            continue
        record = load_record(directory)
        if record is None or not supervisor_alive(directory, record):
            if clean_dead and _old_enough(directory):
                reap(directory, record)
            continue
        if not pooled and unclaimed(record):
            continue
        record["directory"] = str(directory)
        found.append(record)
    return found


def _old_enough(directory: Path) -> bool:
    # A sandbox being created has no live supervisor for a moment: leave young dirs alone.
    try:
        return time.time() - directory.stat().st_mtime > 120 or (directory / "state.json").exists()
    except FileNotFoundError:
        return False


def find_sandbox(name_or_id: str) -> tuple[Path, dict[str, Any]]:
    """Locate a live sandbox by id or name; raises ``SandboxNotFound`` listing what exists."""
    records = list_sandboxes()
    for record in records:
        if name_or_id in (record.get("id"), record.get("name")):
            return Path(record["directory"]), record
    names = sorted(r.get("name", r.get("id", "?")) for r in records)
    raise errors.SandboxNotFound(
        f"no running sandbox named {name_or_id!r}" + (f"; running: {', '.join(names)}" if names else "; none running"),
        name=name_or_id,
        available=names,
    )
