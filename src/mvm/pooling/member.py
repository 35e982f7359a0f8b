"""A pool member's side, in its own supervisor: waiting in state ``pooled``, leaving when
its pool closes or its TTL runs out, and the ``sandbox.claim`` operation that turns it
into the sandbox a create asked for.

A claim applies everything the create asks for that a pre-started sandbox can still
take: its name, TTL (counted from the claim), env and secret env (values in memory
only), workload id, tags, run id, on_behalf_of and auto_pause. Whatever the member was
started with (template, backend, resources, network policy) the claimer matched before
taking it (``PoolSpec.serves``). The audit chain then holds ``sandbox.prestart`` (by the
pool's owner) followed by ``sandbox.create`` by the claiming client, naming the pool.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from .. import errors
from ..osutil import write_json_atomic
from ..security.secrets import Redactor
from ..spec import SandboxConfig
from ..templates.builder import built_digest
from . import store

if TYPE_CHECKING:
    from ..supervisor.server import Supervisor
    from ..supervisor.session import Reply, RequestContext

POOLED = "pooled"
#: What a claim may set (the rest of the member's config is what the pool serves).
CLAIMED_FIELDS = ("name", "workload_id", "ttl_seconds", "auto_pause_seconds", "env", "secret_env_names", "tags",
                  "run_id", "on_behalf_of", "created_at")
_WATCH_INTERVAL = 0.25


class Membership:
    """A supervisor's pool membership (None for a sandbox that was not pre-started)."""

    def __init__(self, pool_id: str, prestarted_at: float):
        self.pool_id = pool_id
        self.prestarted_at = prestarted_at
        self.prestart_audit_id: str | None = None
        self.claimed_at: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"id": self.pool_id, "prestarted_at": self.prestarted_at, "claimed_at": self.claimed_at,
                "prestart_audit_id": self.prestart_audit_id}


def prestarted(sup: Supervisor, membership: Membership) -> None:
    """The member booted: audited as pre-started (not yet created for anyone), then it waits."""
    membership.prestart_audit_id = sup.audit.record(
        "sandbox.prestart", {"template": sup.config["template"], "backend": sup.config["backend"]},
        details={"pool": membership.pool_id})
    sup.logs.system(f"sandbox pre-started for pool {membership.pool_id} (template {sup.config['template']}, "
                    f"backend {sup.config['backend']})", membership.prestart_audit_id)
    sup.set_state(POOLED)
    threading.Thread(target=_watch_pool, args=(sup, membership), name="mvm-pool", daemon=True).start()


def _watch_pool(sup: Supervisor, membership: Membership) -> None:
    """Leave once the pool is closed while still unclaimed (the TTL is ``_ttl_watch``'s)."""
    pool_file = store.pool_dir(membership.pool_id) / store.POOL_FILE
    while not sup.destroyed.wait(_WATCH_INTERVAL):
        with sup.state_lock:
            if sup.state != POOLED:
                return
            closed = not pool_file.exists()
        if closed:
            sup.destroy("pool closed")
            sup.exit_after_destroy()
            return


def leaving(sup: Supervisor, membership: Membership) -> None:
    """Called first thing in ``destroy``: an unclaimed member takes itself out of the pool
    (no create may pick a dying member), and the last member of an abandoned pool
    removes the pool."""
    if membership.claimed_at is None:
        store.take(membership.pool_id, sup.sandbox_id)
        store.forget_if_abandoned(membership.pool_id)


def claim_args(config: SandboxConfig, secret_env: dict[str, str]) -> dict[str, Any]:
    """The ``sandbox.claim`` arguments for a create that asked for ``config``."""
    data = config.to_json()
    return {**{key: data[key] for key in CLAIMED_FIELDS}, "secret_env": dict(secret_env)}


def template_digest(sup: Supervisor, ctx: RequestContext) -> Reply:
    """``sandbox.template_digest``: the digest a create of this sandbox's template gets now
    (``ensure_template`` without building; None when it would build). A claimer that cannot
    compute it (the TypeScript SDK) compares it with its pool's, as ``PoolSpec.serves`` does,
    before taking a member: a pool made from another build of the template serves nobody."""
    template = str(sup.config["template"])
    return {"template": template, "digest": built_digest(template)}, b""


def claim(sup: Supervisor, ctx: RequestContext) -> Reply:
    membership = sup.pool
    if membership is None:
        raise errors.InvalidState("sandbox.claim: this sandbox was not pre-started for a pool",
                                  state=sup.state, allowed=[POOLED])
    secret_env = ctx.args.get("secret_env") or {}
    if not isinstance(secret_env, dict) or not all(isinstance(v, str) for v in secret_env.values()):
        raise errors.InvalidArgument("secret_env", "must map env names to strings")
    asked = {key: ctx.args.get(key) for key in CLAIMED_FIELDS}
    # The trust boundary, as for a config.json: the member's own config with the claim's fields.
    config = SandboxConfig.from_json({**sup.config, **asked})
    if set(secret_env) != set(config.secret_env_names):
        raise errors.InvalidArgument("secret_env", "must give a value for each of secret_env_names and no other",
                                     allowed=sorted(config.secret_env_names))
    with sup.state_lock:
        if sup.state != POOLED or sup.destroyed.is_set():
            raise errors.InvalidState(f"sandbox.claim: the sandbox is {sup.state}, not waiting in a pool "
                                      "(a pooled sandbox is handed out once)", state=sup.state, allowed=[POOLED])
        membership.claimed_at = time.time()
        sup.config = config.to_json()
        sup.created_at = config.created_at or membership.claimed_at
        sup.expires_at = membership.claimed_at + config.ttl_seconds if config.ttl_seconds else None
        sup.secret_env = dict(secret_env)
        sup.secrets = {config.secret_env_names[key]: value for key, value in secret_env.items()}
        sup.redactor = Redactor(sup.secrets)
        write_json_atomic(sup.directory / "config.json", sup.config)
        sup.set_state("running")
    sup.idle.start(config.auto_pause_seconds)
    # The claiming client is this thread's actor (its socket credentials and on_behalf_of).
    audit_id = sup.audit.record(
        "sandbox.create", {"template": sup.config["template"], "backend": sup.config["backend"]},
        details={"pool": membership.pool_id, "prestarted_at": membership.prestarted_at,
                 "prestart_audit_id": membership.prestart_audit_id, "secret_env_keys": sorted(secret_env)})
    sup.logs.system(f"sandbox created from template {sup.config['template']} on backend {sup.config['backend']} "
                    f"(claimed from pool {membership.pool_id}, pre-started "
                    f"{membership.claimed_at - membership.prestarted_at:.1f} s earlier)", audit_id)
    store.forget_if_abandoned(membership.pool_id)
    return sup.describe(), b""
