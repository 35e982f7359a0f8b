"""The one launch path of a sandbox: every creator (``Sandbox.create``,
``AsyncSandbox.create``, ``mvmctl up``, ``mvmctl mcp``, a cluster node agent) ends here.

``launch`` takes the config as asked and decides what is still open: the backend
(asked of the backend registry), the template (resolved, built on first use — once
per create), the id and the default name; it claims the name, then claims a waiting
member of a warm pool that serves exactly this config (``mvm/pooling``: a pre-started
sandbox, tens of milliseconds) or else writes ``config.json`` (no secret values),
starts the detached supervisor — forked from this process's zygote, or a fresh
``python -m mvm.supervisor`` — hands it the secret env values in memory only, and
reads one JSON line from a readiness pipe. On any failure nothing is left behind:
the child is killed and the sandbox directory removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import errors
from ..backends import choose_backend, isolation_of
from ..osutil import stamp_alive, stamp_pid, write_json_atomic
from ..paths import sandboxes_dir
from ..spec import SandboxConfig, default_name
from .client import SupervisorClient
from .state import (
    SUPERVISOR_STAMP,
    claim_name,
    load_record,
    move_name,
    new_sandbox_id,
    publish_directory,
    reap,
    release_name,
    stage_directory,
)
from .zygote import Zygote

#: How long a create may take once the template exists (a cold TCG boot plus the
#: ready snapshot is the slow case).
READY_TIMEOUT = 180.0


@dataclass(frozen=True)
class Launched:
    """A sandbox whose agent answered: its config as launched, its directory, and the
    supervisor's ``describe()`` at readiness."""

    config: SandboxConfig
    directory: Path
    state: dict[str, Any]
    #: A claimed pool member comes with the connection it was claimed over.
    client: SupervisorClient | None = None


def launch(asked: SandboxConfig, secret_env: Mapping[str, str], *, timeout: float = READY_TIMEOUT) -> Launched:
    """Start the sandbox ``asked`` describes (already validated by its creator).

    ``asked.id``, ``asked.name`` and ``asked.backend`` may be empty: the launch path picks
    them (a new id; the default name; the strongest backend this host runs, or
    ``$MVM_BACKEND``). A named backend is checked against what this host can run. The
    name is claimed first (``NameTaken`` before anything is built or started).
    """
    from ..pooling.claim import claim_member
    # the template builder (and its OCI code) loads when a sandbox starts, not with this
    # module: the SDK's discovery (list, connect) and `mvmctl ls` do not start one
    from ..templates import ensure_template

    sandbox_id = asked.id or new_sandbox_id()
    name = asked.name or default_name(asked.workload_id, sandbox_id)
    staging = stage_directory(sandbox_id)
    try:
        claim_name(name, sandbox_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        backend = choose_backend(asked.backend or None)
        image = ensure_template(asked.template)  # builds on first use, with progress on a terminal

        def config_for(chosen_id: str) -> SandboxConfig:
            return dataclasses.replace(asked, id=chosen_id, backend=backend, isolation=isolation_of(backend),
                                       name=asked.name or default_name(asked.workload_id, chosen_id))

        if not asked.id:  # a warm pool's member pre-started with this config, if one waits (mvm/pooling)
            claimed = claim_member(config_for, dict(secret_env), image.digest,
                                   dict(asked.on_behalf_of) if asked.on_behalf_of else None)
            if claimed is not None:
                config, state, client = claimed
                _hand_name_to_member(name, sandbox_id, config)
                shutil.rmtree(staging, ignore_errors=True)
                return Launched(config, sandboxes_dir() / config.id, state, client)
        config = dataclasses.replace(config_for(sandbox_id), template_dir=str(image.directory))
        write_json_atomic(staging / "config.json", config.to_json())
        directory = publish_directory(staging, sandbox_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        release_name(name, sandbox_id)
        raise
    state = start_supervisor(directory, dict(secret_env), timeout=timeout)
    return Launched(config, directory, state)


def _hand_name_to_member(claimed: str, sandbox_id: str, config: SandboxConfig) -> None:
    """The create got pool member ``config.id`` rather than ``sandbox_id``: the name it
    claimed goes to the member (an asked name), or the member's derived name replaces the
    one derived from ``sandbox_id``; the member's waiting name (its id) is freed."""
    if config.name == claimed:
        move_name(claimed, sandbox_id, config.id)
    else:
        release_name(claimed, sandbox_id)
        if config.name != config.id:
            # a workload's derived name, new for this id (taken only if 6 hex digits collide)
            with contextlib.suppress(errors.NameTaken):
                claim_name(config.name, config.id)
    if config.name != config.id:
        release_name(config.id, config.id)


def start_supervisor(directory: Path, secret_env: dict[str, str], *, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Start the supervisor of the published sandbox ``directory`` and wait for its
    readiness line; on failure the sandbox is reaped (name claim included)."""
    read_fd, write_fd = os.pipe()
    try:
        try:
            zygote = Zygote.shared()
            if zygote is None or not zygote.spawn(directory, secret_env, write_fd):
                _exec_supervisor(directory, secret_env, write_fd)
        finally:
            os.close(write_fd)
        message = _read_ready(read_fd, directory, timeout)
    except BaseException:
        _abandon(directory)
        raise
    finally:
        os.close(read_fd)
    if not message.get("ok"):
        _abandon(directory)
        raise errors.from_wire(message.get("error") or {"type": "SandboxError", "message": "create failed"})
    return dict(message["state"])


def _exec_supervisor(directory: Path, secret_env: dict[str, str], write_fd: int) -> None:
    """The cold path: a fresh ``python -m mvm.supervisor`` (which forks and detaches)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVM_SECRET_")}
    with open(directory / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mvm.supervisor", str(directory), "--ready-fd", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd="/",
        )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(secret_env).encode())
    proc.stdin.close()
    proc.wait(timeout=30)  # the launcher forks the real supervisor and exits at once


def _read_ready(fd: int, directory: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.SandboxError(f"the sandbox did not become ready within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
    if b"\n" not in buffer:
        tail = _log_tail(directory / "supervisor.log")
        raise errors.SandboxError(f"the sandbox supervisor exited during create{tail}")
    return dict(json.loads(buffer.split(b"\n", 1)[0]))


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()[-8:]
    except OSError:
        return ""
    return (":\n  " + "\n  ".join(lines)) if lines else ""


def _abandon(directory: Path) -> None:
    """Kill a supervisor that failed to come up (its SIGTERM handler cleans the backend),
    then reap whatever is left (its name claim too)."""
    try:
        stamp: str | None = (directory / SUPERVISOR_STAMP).read_text()
    except OSError:
        stamp = None
    pid = stamp_pid(stamp)
    if pid is not None and stamp_alive(stamp):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and stamp_alive(stamp):
            time.sleep(0.05)
    record = load_record(directory)
    if directory.exists():
        reap(directory, record)
