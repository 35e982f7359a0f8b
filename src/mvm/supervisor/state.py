"""A sandbox's on-disk record, its name claim, and discovery — from files alone.

Under ``$MVM_HOME/sandboxes/<id>/``:

* ``launcher`` (the creating process's stamp, ``"PID START"``) and ``config.json`` are
  written by the launch path in a staging directory ``.new-<id>-<PID>-<START>`` that is
  renamed into place once the name is claimed, so a sandbox directory never exists
  without them;
* ``supervisor.pid`` (the supervisor's stamp) is written by the supervisor as it starts;
* ``state.json`` is rewritten atomically by the supervisor on every state change.

``$MVM_HOME/names/<name>`` is a name's claim: a file holding the sandbox id, created
with ``link(2)`` (atomic and exclusive like ``O_EXCL``) before the sandbox directory
appears, and removed after it is gone — when the sandbox is destroyed or reaped.

Discovery (``list_sandboxes``, ``find_sandbox``) reads these files and checks that the
sandbox's owner — its supervisor, or while it has none yet its launcher — still runs:
the same pid *and* the same start time, so a reused pid does not count. It never
connects to a sandbox and never removes anything. A sandbox whose owner died is
``lost``; ``gc`` reaps lost sandboxes (processes, mounts, cgroups, snapshot-store
leftovers, the directory, the name claim). TTLs are each supervisor's own business.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

from .. import errors
from ..osutil import (
    create_private_exclusive,
    file_lock,
    pid_alive,
    process_stamp,
    stamp_alive,
    stamp_pid,
    write_private_atomic,
)
from ..paths import names_dir, sandboxes_dir
from ..spec import validate_name as validate_name  # defined with the rest of the sandbox spec

STATES = ("creating", "pooled", "running", "paused", "stopped", "destroyed", "error", "lost")
CONTROL_SOCKET = "control.sock"
LAUNCHER_STAMP = "launcher"
SUPERVISOR_STAMP = "supervisor.pid"
_STAGING = ".new-"  # .new-<id>-<PID>-<START>: a sandbox directory being made
_RETIRED = ".gone-"  # .gone-<id>: a sandbox directory being removed


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
        except (FileNotFoundError, NotADirectoryError, ValueError, json.JSONDecodeError):
            continue
    return None


# ---- making and retiring a sandbox directory ----------------------------------------


def stage_directory(sandbox_id: str) -> Path:
    """A staging directory holding this process's launcher stamp, invisible to discovery
    until :func:`publish_directory` (``config.json`` is written into it in between)."""
    stamp = process_stamp()
    staging = sandboxes_dir() / f"{_STAGING}{sandbox_id}-{stamp.replace(' ', '-')}"
    staging.mkdir(mode=0o700)
    try:
        write_private_atomic(staging / LAUNCHER_STAMP, stamp.encode(), durable=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def publish_directory(staging: Path, sandbox_id: str) -> Path:
    directory = sandboxes_dir() / sandbox_id
    os.rename(staging, directory)
    return directory


def write_supervisor_stamp(directory: Path) -> None:
    """The supervisor takes the sandbox over from its launcher (called as it starts)."""
    write_private_atomic(directory / SUPERVISOR_STAMP, process_stamp().encode(), durable=False)


def retire_directory(directory: Path, name: str | None) -> None:
    """Remove a sandbox's directory, then free its name. The directory is first renamed
    aside, so discovery sees the sandbox whole or not at all."""
    retired = directory.with_name(_RETIRED + directory.name)
    try:
        os.rename(directory, retired)
    except FileNotFoundError:
        retired = directory  # someone else retired it; sweep what may be left
    except OSError:
        retired = directory
    shutil.rmtree(retired, ignore_errors=True)
    if name:
        release_name(name, directory.name)


# ---- owners and states --------------------------------------------------------------


def owner_stamp(directory: Path) -> str | None:
    """The stamp of whoever owns the sandbox now: its supervisor, else its launcher."""
    for name in (SUPERVISOR_STAMP, LAUNCHER_STAMP):
        try:
            return (directory / name).read_text()
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def owner_alive(directory: Path) -> bool:
    return stamp_alive(owner_stamp(directory))


def sandbox_state(directory: Path, record: dict[str, Any]) -> str:
    """``lost`` if the owner died, else what the supervisor last wrote (``creating`` before)."""
    if not owner_alive(directory):
        return "lost"
    return str(record.get("state") or "creating")


# ---- name claims ------------------------------------------------------------------


def _claim_path(name: str) -> Path:
    return names_dir() / validate_name(name)


def name_holder(name: str) -> str | None:
    """The id of the sandbox holding ``name``'s claim (which may be stale), or None."""
    try:
        return _claim_path(name).read_text().strip() or None
    except FileNotFoundError:
        return None


def _holder_exists(sandbox_id: str) -> bool:
    """Whether the claim's sandbox is still there: being made by a live launcher, or
    published (in any state, ``lost`` too). Staging is checked first: it turns into the
    published directory by one rename, so one of the two checks sees it."""
    root = sandboxes_dir()
    for entry in root.glob(f"{_STAGING}{sandbox_id}-*"):
        pid_start = entry.name[len(_STAGING) + len(sandbox_id) + 1:]
        if stamp_alive(pid_start.replace("-", " ")):
            return True
    return (root / sandbox_id).is_dir()


def claim_name(name: str, sandbox_id: str) -> None:
    """Claim ``name`` for ``sandbox_id`` or raise ``NameTaken``. Atomic: of creators racing
    for one name exactly one wins. A claim left by a sandbox that no longer exists (its
    creator or supervisor died between the two steps) is taken over."""
    path = _claim_path(name)
    for _ in range(8):
        if create_private_exclusive(path, sandbox_id.encode(), durable=False):
            return
        holder = name_holder(name)
        if holder is not None and _holder_exists(holder):
            lost = "" if owner_alive(sandboxes_dir() / holder) else "; it is lost: `mvmctl gc` frees the name"
            raise errors.NameTaken("name", f"a sandbox named {name!r} already exists ({holder}{lost})",
                                   sandbox_id=holder)
        _drop_stale_claim(name, holder)
    raise errors.NameTaken("name", f"the name {name!r} is being claimed by others at the same time")


def _drop_stale_claim(name: str, holder: str | None) -> None:
    # Every removal of a claim happens under this lock and re-reads the holder first, so a
    # claim made meanwhile by someone else is never removed.
    with file_lock(names_dir() / ".lock"):
        current = name_holder(name)
        if current is not None and current == holder and not _holder_exists(current):
            _claim_path(name).unlink(missing_ok=True)


def move_name(name: str, from_id: str, to_id: str) -> None:
    """Hand ``name``'s claim from ``from_id`` to ``to_id`` in one step (a create that got a
    warm pool's member instead of the sandbox it had claimed the name for)."""
    with file_lock(names_dir() / ".lock"):
        if name_holder(name) != from_id:
            raise errors.NameTaken("name", f"the claim on {name!r} is no longer {from_id}'s",
                                   sandbox_id=name_holder(name))
        write_private_atomic(_claim_path(name), to_id.encode(), durable=False)


def release_name(name: str, sandbox_id: str) -> None:
    """Free ``name`` if ``sandbox_id`` holds it (a no-op otherwise)."""
    try:
        path = _claim_path(name)
    except errors.InvalidArgument:
        return
    with file_lock(names_dir() / ".lock"):
        if name_holder(name) == sandbox_id:
            path.unlink(missing_ok=True)


# ---- discovery --------------------------------------------------------------------


def _directories() -> list[Path]:
    return [sandboxes_dir() / entry for entry in sorted(os.listdir(sandboxes_dir())) if not entry.startswith(".")]


def _described(directory: Path) -> dict[str, Any] | None:
    record = load_record(directory)
    if record is None:  # removed meanwhile
        return None
    record["state"] = sandbox_state(directory, record)
    record["directory"] = str(directory)
    return record


def unclaimed(record: dict[str, Any]) -> bool:
    """A warm pool's member nobody claimed yet: not a sandbox anyone created (mvm/pooling)."""
    return bool(record.get("pool")) and record.get("state", "creating") in ("creating", "pooled")


def list_sandboxes(*, pooled: bool = False) -> list[dict[str, Any]]:
    """Every sandbox on this host (with ``pooled``, also unclaimed pool members): its record
    with ``state`` (``lost`` if its supervisor died) and ``directory``. Reads files only:
    no connection, no clean-up."""
    found = []
    for directory in _directories():
        record = _described(directory)
        if record is not None and (pooled or not unclaimed(record)):
            found.append(record)
    return found


def find_sandbox(name_or_id: str) -> tuple[Path, dict[str, Any]]:
    """Locate a sandbox by id or name. ``SandboxNotFound`` (listing what exists) if there
    is none, ``SandboxLost`` if its supervisor died."""
    record = None
    if isinstance(name_or_id, str) and name_or_id and "/" not in name_or_id and not name_or_id.startswith("."):
        record = _described(sandboxes_dir() / name_or_id)
        if record is None:
            try:
                holder = name_holder(name_or_id)
            except errors.InvalidArgument:  # not a sandbox name
                holder = None
            if holder is not None and "/" not in holder:
                record = _described(sandboxes_dir() / holder)
    if record is not None and unclaimed(record):
        record = None  # a waiting pool member is nobody's sandbox yet
    if record is None:
        names = sorted(r.get("name", r.get("id", "?")) for r in list_sandboxes() if r["state"] != "lost")
        raise errors.SandboxNotFound(
            f"no running sandbox named {name_or_id!r}"
            + (f"; running: {', '.join(names)}" if names else "; none running"),
            name=name_or_id,
            available=names,
        )
    if record["state"] == "lost":
        raise errors.SandboxLost(
            f"sandbox {record['name']} ({record['id']}) is lost: its supervisor died; "
            "`mvmctl gc` (mvm.gc()) removes what it left",
            sandbox_id=record["id"], name=record["name"], state="lost",
        )
    return Path(record["directory"]), record


# ---- reaping ----------------------------------------------------------------------


def reap(directory: Path, record: dict[str, Any] | None) -> None:
    """Remove a sandbox whose supervisor is gone (or is to go): the supervisor if it still
    runs, its backend's leftovers (guest processes, mounts, cgroups), the snapshot store's
    leftovers, the directory, the name claim. Raises ``SandboxError`` if the backend could
    not undo something (the sandbox then stays, ``lost``, for another try)."""
    from ..backends import get_backend  # late: keeps discovery's imports light

    stamp = owner_stamp(directory)
    pid = stamp_pid(stamp)
    if pid is not None and stamp_alive(stamp) and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if record:
        backend_name = record.get("backend")
        if backend_name:
            try:
                get_backend(backend_name).cleanup_orphan(directory)
            except errors.BackendUnavailable:
                pass
        # a supervisor killed mid snapshot save / restore left a staging or unsealed directory
        from ..snapshots import SnapshotStore

        SnapshotStore().sweep_leftovers()
    retire_directory(directory, (record or {}).get("name"))


def gc() -> list[dict[str, Any]]:
    """Reap every ``lost`` sandbox; also remove what dead launchers and supervisors left
    half-way (staging or retired directories, claims of sandboxes that are gone).
    Returns the records of the sandboxes reaped; a sandbox whose backend could not be
    cleaned stays and is named in the ``SandboxError`` raised after all others."""
    reaped, failures = [], []
    for directory in _directories():
        try:
            lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # two gc runs at once reap each sandbox once
            record = _described(directory)
            if record is None or record["state"] != "lost":
                continue
            try:
                reap(directory, record)
            except errors.MvmError as exc:
                failures.append(f"{record['id']}: {exc}")
                continue
            record["directory"] = None
            reaped.append(record)
        finally:
            os.close(lock)
    _sweep_half_made()
    if failures:
        raise errors.SandboxError("gc could not clean every lost sandbox: " + "; ".join(failures),
                                  failures=failures, reaped=[r["id"] for r in reaped])
    return reaped


def _sweep_half_made() -> None:
    from ..snapshots.streams import sweep_stale_stream_dirs  # (the snapshots package loads lazily)

    sweep_stale_stream_dirs()
    root = sandboxes_dir()
    for entry in os.listdir(root):
        dead_launcher = entry.startswith(_STAGING) and not stamp_alive(" ".join(entry.rsplit("-", 2)[1:]))
        if entry.startswith(_RETIRED) or dead_launcher:
            shutil.rmtree(root / entry, ignore_errors=True)
    for claim in names_dir().iterdir():
        if claim.name.startswith("."):  # .lock, or .NAME.tmp-PID-X a killed claimer left
            pid = claim.name.rsplit(".tmp-", 1)[-1].split("-")[0]
            if ".tmp-" in claim.name and pid.isdigit() and not pid_alive(int(pid)):
                claim.unlink(missing_ok=True)
            continue
        holder = name_holder(claim.name)
        if holder is None or not _holder_exists(holder):
            _drop_stale_claim(claim.name, holder)
