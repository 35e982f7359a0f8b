"""Warm pools on disk: what a pool serves, its claimable members, the atomic take.

Layout (``$MVM_HOME/pools/<pool_id>/``)::

    pool.json           the PoolSpec it serves, its owner process (pid + start time), created_at
    ready/<sandbox_id>  one empty file per member that waits to be claimed

A member is an ordinary sandbox (``sandboxes/<id>/``, its own detached supervisor) whose
config names the pool and whose state is ``pooled``. Taking a member is unlinking its
``ready/`` entry: of any number of processes racing for it exactly one unlink succeeds,
so a member is handed out once (its supervisor also refuses a second claim). There is no
daemon: the owner process refills the pool; each member's supervisor enforces its own TTL
and leaves when the pool is closed (``pool.json`` gone).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import errors
from ..backends import pool_backend_names
from ..durations import parse_duration
from ..osutil import process_is, process_start_time, write_json_atomic
from ..paths import pools_dir
from ..spec import NetworkPolicy, Resources, SandboxConfig

#: At most this many members per pool (each is a running sandbox: its supervisor, agent
#: and memory are held while it waits).
MAX_POOL_SIZE = 16
#: Members kept waiting when a pool names no size.
DEFAULT_POOL_SIZE = 2
#: And at most this many members waiting in all the pools of one ``$MVM_HOME`` together.
MAX_POOLED = 32
#: How long an unclaimed member waits before its supervisor destroys it.
DEFAULT_MEMBER_TTL = "10m"
MAX_MEMBER_TTL_SECONDS = 24 * 3600
POOL_FILE = "pool.json"
READY_DIR = "ready"


@dataclass(frozen=True)
class PoolSpec:
    """What a pool's members are: a create is served by a member only if it asks for
    exactly this (everything else it asks for is applied when it claims one)."""

    template: str
    backend: str
    resources: Resources
    network: NetworkPolicy
    template_digest: str

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "backend": self.backend, "resources": self.resources.to_json(),
                "network": self.network.to_json(), "template_digest": self.template_digest}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolSpec:
        return cls(template=str(data["template"]), backend=str(data["backend"]),
                   resources=Resources.from_json(data["resources"]), network=NetworkPolicy.from_json(data["network"]),
                   template_digest=str(data["template_digest"]))

    def serves(self, config: SandboxConfig, template_digest: str) -> bool:
        return (config.from_snapshot is None and config.template == self.template and config.backend == self.backend
                and template_digest == self.template_digest and config.resources == self.resources
                and config.network == self.network)


def validate_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_POOL_SIZE:
        raise errors.InvalidArgument("size", f"{size!r} is not a pool size", allowed=f"an int in 1..{MAX_POOL_SIZE}")
    return size


def validate_member_ttl(ttl: Any) -> int:
    """An unclaimed member's time to live: required (a pooled sandbox always expires)."""
    seconds = None if ttl is None else parse_duration(ttl, field="ttl")
    if seconds is None or not 1 <= seconds <= MAX_MEMBER_TTL_SECONDS:
        raise errors.InvalidArgument("ttl", f"{ttl!r} is not a pool member's time to live",
                                     allowed="a duration from 1s to 24h, e.g. '10m'")
    return seconds


def validate_pool_backend(backend: Any) -> str:
    """``backend`` if a pool can pre-start its sandboxes (``Backend.poolable``, as the backend
    registry answers), else refused; ``None``: the first backend that can."""
    poolable = pool_backend_names()
    if backend is None and poolable:
        return poolable[0]
    if backend not in poolable:
        raise errors.InvalidArgument("backend", f"a pool cannot pre-start {backend!r} sandboxes", allowed=poolable)
    return str(backend)


def new_pool_id() -> str:
    return "pl-" + secrets.token_hex(5)


def pool_dir(pool_id: str) -> Path:
    return pools_dir() / pool_id


def create_pool(pool_id: str, spec: PoolSpec, size: int, member_ttl_seconds: int, *, owned: bool) -> dict[str, Any]:
    """Write a new pool's directory; ``owned``: this process refills it (else nobody does)."""
    pooled = sum(int(record.get("size") or 0) for _, record in live_pools())
    if pooled + size > MAX_POOLED:
        raise errors.InvalidArgument(
            "size", f"{size} more members would exceed the {MAX_POOLED} pooled sandboxes a host keeps "
            f"({pooled} already in other pools); close a pool first", allowed=f"at most {MAX_POOLED - pooled}")
    directory = pool_dir(pool_id)
    (directory / READY_DIR).mkdir(parents=True, mode=0o700)
    record = pool_record(pool_id, spec, size, member_ttl_seconds, owned=owned)
    write_json_atomic(directory / POOL_FILE, record)
    return record


def pool_record(pool_id: str, spec: PoolSpec, size: int, member_ttl_seconds: int, *, owned: bool) -> dict[str, Any]:
    """What ``pool.json`` holds."""
    pid = os.getpid()
    return {"id": pool_id, "serves": spec.to_json(), "size": size, "member_ttl_seconds": member_ttl_seconds,
            "owner": {"pid": pid, "start_ticks": process_start_time(pid)} if owned else None,
            "created_at": time.time()}


def read_pool(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / POOL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def live_pools() -> list[tuple[Path, dict[str, Any]]]:
    """Every open pool (its ``pool.json`` readable), oldest first."""
    found = []
    for directory in pools_dir().iterdir():
        record = read_pool(directory)
        if record is not None:
            found.append((directory, record))
    return sorted(found, key=lambda item: float(item[1].get("created_at") or 0))


def owner_alive(record: dict[str, Any]) -> bool:
    owner = record.get("owner") or {}
    return process_is(owner.get("pid"), owner.get("start_ticks"))


def ready_members(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory / READY_DIR))
    except OSError:
        return []


def add_ready(pool_id: str, sandbox_id: str) -> bool:
    """List a started member as claimable; False if the pool was closed meanwhile."""
    directory = pool_dir(pool_id)
    if read_pool(directory) is None:
        return False
    try:
        os.close(os.open(directory / READY_DIR / sandbox_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return False
    return True


def take(pool_id: str, sandbox_id: str) -> bool:
    """Take a member out of the pool: True for exactly one caller."""
    try:
        os.unlink(pool_dir(pool_id) / READY_DIR / sandbox_id)
        return True
    except OSError:
        return False


def takeable(directory: Path) -> list[str]:
    """A pool's ready members in random order: concurrent creators mostly try different ones."""
    members = ready_members(directory)
    random.shuffle(members)
    return members


def close_pool_record(pool_id: str) -> list[str]:
    """Close a pool: no create finds it from now on. Returns the members this call took
    (the caller destroys them); members still starting see the pool gone and leave."""
    directory = pool_dir(pool_id)
    try:
        os.unlink(directory / POOL_FILE)
    except OSError:
        pass
    return [member for member in ready_members(directory) if take(pool_id, member)]


def remove_pool_dir(pool_id: str) -> None:
    shutil.rmtree(pool_dir(pool_id), ignore_errors=True)


def forget_if_abandoned(pool_id: str) -> None:
    """Remove a pool nobody refills (its owner is gone) once its last member left."""
    directory = pool_dir(pool_id)
    record = read_pool(directory)
    if record is not None and not owner_alive(record) and not ready_members(directory):
        close_pool_record(pool_id)
        remove_pool_dir(pool_id)
