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

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import errors
from ..backends import choose_backend
from ..osutil import write_json_atomic
from ..paths import sandboxes_dir
from ..spec import SandboxConfig, default_name
from ..templates import ensure_template
from .client import SupervisorClient
from .state import list_sandboxes, new_sandbox_id
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
    ``$MVM_BACKEND``). A named backend is checked against what this host can run.
    """
    from ..pooling.claim import claim_member

    backend = choose_backend(asked.backend or None)
    image = ensure_template(asked.template)  # builds on first use, with progress on a terminal

    def config_for(sandbox_id: str) -> SandboxConfig:
        return dataclasses.replace(asked, id=sandbox_id, backend=backend,
                                   name=asked.name or default_name(asked.workload_id, sandbox_id))

    if asked.name:
        _ensure_name_free(asked.name)
    if not asked.id:  # a warm pool's member pre-started with this config, if one waits (mvm/pooling)
        claimed = claim_member(config_for, dict(secret_env), image.digest,
                               dict(asked.on_behalf_of) if asked.on_behalf_of else None)
        if claimed is not None:
            config, state, client = claimed
            return Launched(config, sandboxes_dir() / config.id, state, client)
    config = config_for(asked.id or new_sandbox_id())
    if not asked.name:
        _ensure_name_free(config.name)
    state = spawn_supervisor(config.to_json(), dict(secret_env), timeout=timeout)
    return Launched(config, sandboxes_dir() / config.id, state)


def _ensure_name_free(name: str) -> None:
    for record in list_sandboxes():
        if record.get("name") == name:
            raise errors.InvalidArgument("name", f"a sandbox named {name!r} already exists ({record['id']})")


def spawn_supervisor(
    config: dict[str, Any], secret_env: dict[str, str], *, timeout: float = READY_TIMEOUT
) -> dict[str, Any]:
    directory = sandboxes_dir() / config["id"]
    directory.mkdir(mode=0o700)
    write_json_atomic(directory / "config.json", config)
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
    then remove whatever is left."""
    from ..osutil import pid_alive
    from .state import load_record, reap

    try:
        pid = int((directory / "supervisor.pid").read_text())
    except (OSError, ValueError):
        pid = 0
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
    if directory.exists():
        reap(directory, load_record(directory))
