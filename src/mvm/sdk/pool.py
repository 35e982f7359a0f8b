"""``mvm.pool``: a bounded, TTL'd warm pool of pre-started sandboxes, so that a create
is answered by claiming one (tens of milliseconds) instead of starting one.

>>> import mvm
>>> with mvm.pool("python-3.13", size=4, ttl="10m") as pool:
...     sandbox = mvm.Sandbox.create("python-3.13", backend="namespace")  # claims a member
...     print(sandbox.describe().details["pool"]["id"] == pool.id)
True

Any create — in this process or another of the same ``$MVM_HOME``, sync or async, the
CLI, the TypeScript SDK through ``mvmctl up`` — that asks for what a pool serves
(template, backend, resources, network policy; no ``from_snapshot``) claims a member;
anything else it asks for (name, ttl, env, secrets, tags, on_behalf_of, auto_pause) is
applied at the claim. The process that made the pool refills it in a background thread;
``close()`` (or the end of the ``with``) destroys the members nobody claimed. If that
process dies, each member still ends itself when its ``ttl`` runs out: there is no daemon.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..backends import choose_backend
from ..pooling import store
from ..pooling.ending import destroy_member, member_alive
from ..spec import DEFAULT_TEMPLATE, NetworkPolicy, Resources, SandboxConfig
from ..supervisor.launch import launch
from ..supervisor.state import new_sandbox_id

if TYPE_CHECKING:
    from .sandbox import Sandbox

#: The refill thread looks at the pool this often (a claim in this process wakes it at once).
_REFILL_POLL = 0.2
#: After a failed start, the refill waits this long before the next, doubling up to the cap.
_BACKOFF = (1.0, 30.0)


#: ``Sandbox.create`` arguments a pool's ``create`` does not take: they are what the pool serves.
POOL_OWN_OPTIONS = ("template", "backend", "resources", "network", "from_snapshot", "cluster")


def refused_option(key: str) -> errors.InvalidArgument:
    """What ``Pool.create(key=...)`` raises for one of ``POOL_OWN_OPTIONS`` (the TypeScript
    SDK's ``Pool.create`` raises these same errors: ``mvmctl pool hold`` hands them over)."""
    return errors.InvalidArgument(key, "is the pool's own: use Sandbox.create for another one",
                                  allowed="name, workload_id, ttl, include, env, tags, on_behalf_of, auto_pause, mode")


@dataclass(frozen=True)
class PoolInfo:
    """A pool as ``describe()`` / ``mvm.pools()`` report it."""

    id: str
    template: str
    backend: str
    resources: Resources
    network: NetworkPolicy
    size: int
    #: Members waiting to be claimed now (each a sandbox id).
    ready: list[str]
    #: How long an unclaimed member waits before it ends itself.
    ttl_seconds: int
    #: The process that refills it, and whether it still runs (else nothing refills it).
    owner_pid: int | None
    refilling: bool
    created_at: float
    #: The last error a refill hit (None after a success).
    last_error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict[str, Any], ready: list[str], last_error: str | None = None) -> PoolInfo:
        spec = store.PoolSpec.from_json(record["serves"])
        owner = record.get("owner") or {}
        return cls(id=str(record["id"]), template=spec.template, backend=spec.backend, resources=spec.resources,
                   network=spec.network, size=int(record["size"]), ready=ready,
                   ttl_seconds=int(record["member_ttl_seconds"]), owner_pid=owner.get("pid"),
                   refilling=store.owner_alive(record), created_at=float(record["created_at"]),
                   last_error=last_error, details={"template_digest": spec.template_digest})

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "template": self.template, "backend": self.backend,
                "resources": self.resources.to_json(), "network": self.network.to_json(), "size": self.size,
                "ready": list(self.ready), "ttl_seconds": self.ttl_seconds, "owner_pid": self.owner_pid,
                "refilling": self.refilling, "created_at": self.created_at, "last_error": self.last_error,
                "details": dict(self.details)}


class Pool:
    """A warm pool this process owns: ``size`` pre-started sandboxes, kept filled in the
    background until ``close()``. Make one with :func:`mvm.pool`."""

    def __init__(
        self, pool_id: str, spec: store.PoolSpec, size: int, ttl_seconds: int, *, refill: bool, recorded: bool = False
    ):
        self.id = pool_id
        self.spec = spec
        self.size = size
        self.ttl_seconds = ttl_seconds
        #: record/plan mode: nothing starts (creates are recorded, not served)
        self.recorded = recorded
        self._record = (store.pool_record(pool_id, spec, size, ttl_seconds, owned=False) if recorded
                        else store.create_pool(pool_id, spec, size, ttl_seconds, owned=refill))
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._owner_pid = os.getpid()
        if refill:
            _OWNED.add(self)

    def __repr__(self) -> str:
        return f"<Pool {self.id} {self.spec.template}/{self.spec.backend} size={self.size}>"

    @property
    def template(self) -> str:
        return self.spec.template

    @property
    def closed(self) -> bool:
        """Closed by ``close()``/``detach()``, or by another process (``mvmctl pool down``)."""
        return self._closed.is_set() or store.read_pool(store.pool_dir(self.id)) is None

    # ---- use -----------------------------------------------------------------------------

    def create(self, **options: Any) -> Sandbox:
        """``Sandbox.create`` with this pool's template, backend, resources and network (so
        it claims a member when one is ready); ``options`` are the rest of its arguments."""
        from .sandbox import Sandbox

        for key in POOL_OWN_OPTIONS:
            if key in options:
                raise refused_option(key)
        sandbox = Sandbox.create(self.spec.template, backend=self.spec.backend, resources=self.spec.resources,
                                 network=self.spec.network, **options)
        self._wake.set()
        return sandbox

    def describe(self) -> PoolInfo:
        ready = [] if self.recorded else store.ready_members(store.pool_dir(self.id))
        return PoolInfo.from_record(self._record, ready, self._last_error)

    def wait_ready(self, timeout: float = 60.0) -> PoolInfo:
        """Block until all ``size`` members are waiting (a test or a benchmark wants a
        full pool; a create never waits for one)."""
        deadline = time.monotonic() + timeout
        while not self.recorded:
            info = self.describe()
            if len(info.ready) >= self.size:
                return info
            if self._closed.is_set():
                raise errors.InvalidState(f"pool {self.id} is closed", state="closed")
            if time.monotonic() >= deadline:
                raise errors.SandboxError(f"pool {self.id}: {len(info.ready)} of {self.size} members ready after "
                                          f"{timeout:.0f} s" + (f" (last error: {info.last_error})"
                                                                if info.last_error else ""))
            self._wake.set()
            time.sleep(0.02)
        return self.describe()

    # ---- filling -------------------------------------------------------------------------

    def start_member(self) -> str:
        """Start one member and list it as claimable (blocking); returns its sandbox id."""
        sandbox_id = new_sandbox_id()  # given: the launch path starts it rather than claim one
        launch(SandboxConfig(id=sandbox_id, name="", template=self.spec.template, backend=self.spec.backend,
                             resources=self.spec.resources, network=self.spec.network,
                             ttl_seconds=self.ttl_seconds, created_at=time.time(), pool=self.id), {})
        if not store.add_ready(self.id, sandbox_id):  # closed meanwhile: it leaves by itself too
            destroy_member(sandbox_id)
            raise errors.InvalidState(f"pool {self.id} was closed while a member started", state="closed")
        return sandbox_id

    def fill(self) -> None:
        """Start members until the pool is full (blocking)."""
        directory = store.pool_dir(self.id)
        while not self.recorded and not self._closed.is_set() and len(_prune_dead(self.id, directory)) < self.size:
            self.start_member()

    def start_refill(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._refill, name=f"mvm-pool-{self.id}", daemon=True)
                self._thread.start()

    def _refill(self) -> None:
        backoff = _BACKOFF[0]
        while not self._closed.is_set():
            if store.read_pool(store.pool_dir(self.id)) is None:  # closed by another process (mvmctl pool down)
                self._closed.set()
                _OWNED.discard(self)
                return
            try:
                self.fill()
                self._last_error = None
                backoff = _BACKOFF[0]
            except Exception as exc:  # kept (last_error) and retried later: the refill must not die
                if self._closed.is_set():
                    return
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._closed.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF[1])
                continue
            self._wake.wait(_REFILL_POLL)
            self._wake.clear()

    # ---- end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop refilling and destroy every member nobody claimed (claimed ones are
        ordinary sandboxes now and go on). Safe to call twice."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join()
        if self.recorded:
            return
        for member in store.close_pool_record(self.id):
            destroy_member(member)
        store.remove_pool_dir(self.id)
        _OWNED.discard(self)

    def detach(self) -> None:
        """Stop refilling but leave the members waiting (each ends itself at its TTL):
        ``mvmctl pool up`` makes a pool that outlives the command."""
        with self._lock:
            self._closed.set()
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join()
        _OWNED.discard(self)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pool(
    template: str = DEFAULT_TEMPLATE,
    *,
    size: int = store.DEFAULT_POOL_SIZE,
    ttl: str | int | float = store.DEFAULT_MEMBER_TTL,
    backend: str | None = None,
    resources: Resources | None = None,
    network: NetworkPolicy | None = None,
    refill: bool = True,
) -> Pool:
    """A warm pool of ``size`` pre-started ``template`` sandboxes (at most
    ``MAX_POOL_SIZE``), each waiting at most ``ttl`` unclaimed ("10m"; 1 s to 24 h).

    A ``Sandbox.create`` asking for the same template, backend, resources and network
    policy claims a member. The first member is started before this returns (a bad
    template or backend fails here, leaving nothing); the rest, and each refill after a
    claim, start in a background thread, and ``close()`` — or this process's exit — destroys
    the members still waiting. ``refill=False``: nothing refills it (``fill()`` fills it
    once) and its members wait until claimed, ``close()``d or their TTL; ``mvmctl pool up``
    makes such a pool. ``backend``: one whose sandboxes a pool can pre-start (``namespace``;
    ``None``: the first such backend).
    """
    from .sandbox import validated_spec, current_mode

    size = store.validate_size(size)
    ttl_seconds = store.validate_member_ttl(ttl)
    live = current_mode() == "live"
    spec_args = validated_spec(template, name=None, workload_id=None, ttl=None, resources=resources,
                                network=network, env=None, tags=None)
    if not live:  # record/plan: a pool changes how fast a live create is served, not what it does
        backend_name = store.validate_pool_backend(backend)
        spec = store.PoolSpec(template=template, backend=backend_name, resources=spec_args["resources"],
                              network=spec_args["network"], template_digest="")
        return Pool(store.new_pool_id(), spec, size, ttl_seconds, refill=False, recorded=True)
    backend_name = choose_backend(store.validate_pool_backend(backend))  # refused if this host cannot run it
    from ..templates import ensure_template  # the builder: only when a pool starts

    image = ensure_template(template)
    spec = store.PoolSpec(template=template, backend=backend_name, resources=spec_args["resources"],
                          network=spec_args["network"], template_digest=image.digest)
    made = Pool(store.new_pool_id(), spec, size, ttl_seconds, refill=refill)
    try:
        made.start_member()
    except BaseException:
        made.close()
        raise
    if refill:
        made.start_refill()
    return made


def pools() -> list[PoolInfo]:
    """Every open pool of this ``$MVM_HOME`` (any process's): what it serves, its waiting
    members (those whose supervisor runs). Only reads: pruning is the owner's refill's job."""
    return [PoolInfo.from_record(record, [m for m in store.ready_members(directory) if member_alive(m)])
            for directory, record in store.live_pools()]


def close_pool(pool_id: str) -> int:
    """Close any process's pool by id (``mvmctl pool down``): its waiting members are
    destroyed. Returns how many. The owner's refill stops when it finds the pool gone."""
    directory = store.pool_dir(pool_id)
    if store.read_pool(directory) is None:
        raise errors.InvalidArgument("pool", f"no open pool {pool_id!r}",
                                     allowed=[str(record["id"]) for _, record in store.live_pools()])
    members = store.close_pool_record(pool_id)
    for member in members:
        destroy_member(member)
    store.remove_pool_dir(pool_id)
    return len(members)


def _prune_dead(pool_id: str, directory: Path) -> list[str]:
    """The owner's refill: the pool's ready members whose supervisor still runs; a dead one's
    entry is dropped and what it left is cleaned up."""
    alive = []
    for member in store.ready_members(directory):
        if member_alive(member):
            alive.append(member)
        elif store.take(pool_id, member):
            destroy_member(member)
    return alive


_OWNED: weakref.WeakSet[Pool] = weakref.WeakSet()


@atexit.register
def _close_owned() -> None:
    """A program that ends without closing its pools leaves no member behind."""
    for owned in list(_OWNED):
        if owned._owner_pid != os.getpid():  # a forked child exiting: the pool is its parent's
            continue
        try:
            owned.close()
        except Exception:
            pass
