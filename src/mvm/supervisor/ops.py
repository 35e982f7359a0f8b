"""The supervisor's operations, one table row per wire op (docs/protocol.md, "Supervisor
operations"): who serves it (a local handler, or the guest agent it is forwarded to), in
which lifecycle states it is allowed, and how it is audited. ``dispatch`` applies a row:
check the state (resuming a paused sandbox when the row and the call allow it), then run
the handler or forward the request, auditing as the row says.

tests/supervisor/test_ops.py checks this table against docs/protocol.md both ways.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import errors
from ..pooling import member as pool_member
from . import file_ops, network, process_ops, sandbox_ops

if TYPE_CHECKING:
    from .server import Supervisor
    from .session import Reply, RequestContext

Handler = Callable[["Supervisor", "RequestContext"], "Reply"]

#: Lifecycle states, as ``Supervisor.state`` spells them.
RUNNING = ("running",)
LIVE = ("running", "paused", "stopped")
ANY_STATE: tuple[str, ...] = ()


class Audit(enum.Enum):
    #: The dispatcher writes one record per call: the op, a digest of its args (all but
    #: ``env``) and payload, its outcome (an error's type) and the bytes moved.
    PER_CALL = "per call"
    #: The handler writes the record itself, naming what it did (argv, pid, snapshot id, ...).
    BY_HANDLER = "by its handler"
    #: A transfer is audited once, by the op that opens it (``fs.write_begin``); its
    #: chunks and its end are not.
    PER_TRANSFER = "once per transfer"
    #: Reads of the sandbox's own state: not audited.
    NEVER = "never"


@dataclass(frozen=True)
class Op:
    name: str
    #: Served here; None: forwarded to the guest agent as it is (ids rewritten).
    handler: Handler | None
    #: Allowed in these states (empty: any). A handler may narrow it by its arguments.
    states: tuple[str, ...]
    audit: Audit
    #: A paused sandbox is resumed first when the call passes ``auto_resume: true``
    #: (only for ops allowed while running); otherwise the call fails with ``SandboxPaused``.
    auto_resume: bool = False
    #: A forwarded op naming a process: it goes only to the agent that started it
    #: (``process_ops.forward_to_its_agent``).
    names_process: bool = False

    @property
    def forwarded(self) -> bool:
        return self.handler is None


def _forwarded(name: str, audit: Audit = Audit.PER_CALL, *, names_process: bool = False) -> Op:
    return Op(name, None, RUNNING, audit, auto_resume=True, names_process=names_process)


OPS: dict[str, Op] = {op.name: op for op in (
    Op("ping", sandbox_ops.ping, ANY_STATE, Audit.NEVER),
    Op("sandbox.describe", sandbox_ops.describe, ANY_STATE, Audit.NEVER),
    Op("sandbox.logs", sandbox_ops.logs, ANY_STATE, Audit.NEVER),
    Op("sandbox.stop", sandbox_ops.stop, LIVE, Audit.BY_HANDLER),
    Op("sandbox.start", sandbox_ops.start, ("stopped", "running"), Audit.BY_HANDLER),
    Op("sandbox.pause", sandbox_ops.pause, ("running", "paused"), Audit.BY_HANDLER),
    # without a snapshot: paused or running only (the handler narrows it)
    Op("sandbox.resume", sandbox_ops.resume, LIVE, Audit.BY_HANDLER),
    Op("sandbox.snapshot", sandbox_ops.snapshot, LIVE, Audit.BY_HANDLER),
    Op("sandbox.destroy", sandbox_ops.destroy, ANY_STATE, Audit.BY_HANDLER),
    Op("sandbox.claim", pool_member.claim, (pool_member.POOLED,), Audit.BY_HANDLER),
    Op("sandbox.template_digest", pool_member.template_digest, ANY_STATE, Audit.NEVER),
    Op("exec.run", process_ops.exec_run, RUNNING, Audit.BY_HANDLER, auto_resume=True),
    Op("proc.start", process_ops.proc_start, RUNNING, Audit.BY_HANDLER, auto_resume=True),
    Op("proc.attach", process_ops.proc_attach, ANY_STATE, Audit.NEVER),
    Op("proc.wait", process_ops.proc_wait, ANY_STATE, Audit.NEVER),
    Op("proc.info", process_ops.proc_info, ANY_STATE, Audit.NEVER),
    _forwarded("proc.stdin", names_process=True),
    _forwarded("proc.signal", names_process=True),
    _forwarded("proc.list", Audit.NEVER),
    Op("fs.read", file_ops.read, RUNNING, Audit.BY_HANDLER, auto_resume=True),
    _forwarded("fs.write"),
    _forwarded("fs.write_begin"),
    _forwarded("fs.write_chunk", Audit.PER_TRANSFER),
    _forwarded("fs.write_end", Audit.PER_TRANSFER),
    _forwarded("fs.list"),
    _forwarded("fs.stat", Audit.NEVER),
    _forwarded("fs.mkdir"),
    _forwarded("fs.remove"),
    _forwarded("fs.move"),
    Op("port.forward", network.port_forward, LIVE, Audit.BY_HANDLER),
    Op("port.list", network.port_list, ANY_STATE, Audit.NEVER),
    Op("port.close", network.port_close, ANY_STATE, Audit.BY_HANDLER),
    Op("network.update", network.network_update, LIVE, Audit.BY_HANDLER),
)}


def dispatch(sup: Supervisor, ctx: RequestContext) -> Reply:
    op = OPS.get(ctx.op)
    if op is None:
        raise errors.UnknownOp(f"unknown operation {ctx.op!r}", allowed=sorted(OPS))
    # popped: the agent is not told (a forwarded request goes as it is), nor the audit
    auto_resume = bool(ctx.args.pop("auto_resume", False))
    if op.states:
        sup.require_state(op.name, *op.states, auto_resume=op.auto_resume and auto_resume)
    if op.handler is not None:
        return op.handler(sup, ctx)
    return _forward(sup, ctx, op)


def _forward(sup: Supervisor, ctx: RequestContext, op: Op) -> Reply:
    audit = op.audit is Audit.PER_CALL
    try:
        if op.names_process:
            result, payload = process_ops.forward_to_its_agent(sup, ctx)
        else:
            result, payload = sup.agent.call(ctx.op, ctx.args, ctx.payload)
    except errors.MvmError as exc:
        if audit:
            sup.audit.record(ctx.op, _digestable(ctx), outcome="error", error_type=exc.wire_type)
        raise
    if audit:
        result["audit_id"] = sup.audit.record(ctx.op, _digestable(ctx),
                                              details={"bytes": len(payload) or len(ctx.payload)})
    return result, payload


def _digestable(ctx: RequestContext) -> dict[str, Any]:
    """What a PER_CALL audit record digests: every argument but ``env``, and the payload."""
    args = {k: v for k, v in ctx.args.items() if k not in ("env",)}
    if ctx.payload:
        args["payload"] = ctx.payload
    return args
