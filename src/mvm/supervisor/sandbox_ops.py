"""The ``sandbox.*`` operations (and ``ping``): describe, logs, and the lifecycle
stop / start / pause / resume / snapshot / destroy, run on the supervisor's backend thread.
The states each is allowed in are its row in ``ops.py``."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING

from .. import errors
from .agent_link import AgentReplaced

if TYPE_CHECKING:
    from .server import Supervisor
    from .session import Reply, RequestContext


def ping(sup: Supervisor, ctx: RequestContext) -> Reply:
    return {"state": sup.state}, b""


def describe(sup: Supervisor, ctx: RequestContext) -> Reply:
    return sup.describe(), b""


def logs(sup: Supervisor, ctx: RequestContext) -> Reply:
    tail = ctx.arg.integer("tail", minimum=0) or None
    since = ctx.arg.number("since")
    follow = ctx.arg.boolean("follow")
    offset = sup.logs.size()
    count = 0
    # Each entry waits for the client's credit: a reader that stalls leaves the rest in the
    # log file (the log is the buffer), read on as it takes more.
    for entry in sup.logs.read(tail=tail, since=since):
        if not ctx.send_data("log", json.dumps(entry).encode(), whole=True):
            break
        count += 1
    if follow:
        def stop() -> bool:
            return ctx.stopping() or sup.destroyed.is_set()

        for entry in sup.logs.follow(offset, stop):
            if not ctx.send_data("log", json.dumps(entry).encode(), whole=True):
                break
            count += 1
    return {"count": count}, b""


def stop(sup: Supervisor, ctx: RequestContext) -> Reply:
    if sup.state != "stopped":
        assert sup.instance is not None
        if sup.state == "paused":
            sup.resume_instance()
        sup.sync_guest()
        sup.agent.detach()
        sup.on_backend(sup.instance.stop)
        sup.processes.mark_all_lost()
        sup.set_state("stopped")
    sup.logs.system("sandbox stopped", sup.audit.record("sandbox.stop", {}))
    return sup.describe(), b""


def start(sup: Supervisor, ctx: RequestContext) -> Reply:
    if sup.state == "stopped":
        assert sup.instance is not None
        sup.processes.new_boot(sup.agent.next_generation)
        sup.attach_agent(sup.on_backend(sup.instance.start))
        sup.set_state("running")
    sup.logs.system("sandbox started", sup.audit.record("sandbox.start", {}))
    return sup.describe(), b""


def pause(sup: Supervisor, ctx: RequestContext) -> Reply:
    sup.idle.paused_by_user()
    if sup.state == "running":
        assert sup.instance is not None
        sup.on_backend(sup.instance.pause)
        sup.set_state("paused")
    sup.logs.system("sandbox paused", sup.audit.record("sandbox.pause", {}))
    return sup.describe(), b""


def resume(sup: Supervisor, ctx: RequestContext) -> Reply:
    snapshot = ctx.args.get("snapshot")
    if snapshot:
        sup.restore_from(str(snapshot), replace_running=True)
        sup.set_state("running")
    else:
        sup.require_state(ctx.op, "paused", "running")  # narrower than the table's row
        sup.idle.paused_by_user()
        if sup.state == "paused":
            sup.resume_instance()
    sup.logs.system("sandbox resumed" + (f" from snapshot {snapshot}" if snapshot else ""),
                    sup.audit.record("sandbox.resume", {"snapshot": snapshot}))
    return sup.describe(), b""


def snapshot(sup: Supervisor, ctx: RequestContext) -> Reply:
    from .. import snapshots

    assert sup.instance is not None
    name = str(ctx.args.get("name") or time.strftime("snap-%Y%m%d-%H%M%S"))
    store = snapshots.SnapshotStore()
    running = sup.state == "running"
    agent = sup.agent.generation
    if running:
        sup.sync_guest()
    # A VM's memory image streams QEMU -> sealer -> store; the rest is sealed from staging.
    info, artifacts = snapshots.save(sup.instance, store, name, sup.sandbox_id, staging_parent=sup.directory,
                                     expires=ctx.args.get("expires"), keep=bool(ctx.args.get("keep")),
                                     run=sup.on_backend)
    if running and artifacts.kind == "full" and not _same_agent_answers(sup, agent):  # memory: processes too
        store.remove(info.id)
        raise errors.SandboxError(f"snapshot {name!r} was not kept: the guest agent died while it was taken (its "
                                  "memory image would hold a guest without its agent); the sandbox goes on with a "
                                  "new agent: take it again", agent_restart=True)
    audit_id = sup.audit.record("snapshot.save", {"name": name, "snapshot": info.id},
                                details={"kind": artifacts.kind})
    sup.logs.system(f"snapshot {info.id} ({name}, {artifacts.kind}) saved", audit_id)
    return dataclasses.replace(info, audit_id=audit_id).to_wire(), b""


def _same_agent_answers(sup: Supervisor, generation: int) -> bool:
    """Whether the agent of connection ``generation`` is still there and answers: one that
    died before the guest's memory was saved (its death may reach us only afterwards) fails
    this call with the restart, or was replaced already."""
    try:
        sup.agent.call("agent.info", {}, timeout=30, generation=generation)
    except (errors.MvmError, AgentReplaced):
        return False
    return True


def destroy(sup: Supervisor, ctx: RequestContext) -> Reply:
    audit_id = sup.destroy("requested")
    return {"audit_id": audit_id}, b""
