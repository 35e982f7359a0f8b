"""Which handler serves each wire operation, and the forwarding of guest operations to the agent."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import errors
from . import process_ops, sandbox_ops
from .network import NETWORK_OPS

if TYPE_CHECKING:
    from .server import Supervisor
    from .session import Reply, RequestContext

#: Guest operations forwarded to the agent as they are (after state check + audit).
FORWARDED_OPS = frozenset({
    "fs.read", "fs.write", "fs.write_begin", "fs.write_chunk", "fs.write_end", "fs.list", "fs.stat",
    "fs.mkdir", "fs.remove", "fs.move", "proc.stdin", "proc.signal", "proc.list",
})
#: Ops whose frequent chunks are audited once per transfer, not per chunk.
UNAUDITED_OPS = frozenset({"fs.write_chunk", "fs.write_end", "proc.list", "fs.stat"})

HANDLERS: dict[str, Callable[[Supervisor, RequestContext], Reply]] = {
    "ping": sandbox_ops.ping,
    "sandbox.describe": sandbox_ops.describe,
    "sandbox.logs": sandbox_ops.logs,
    "sandbox.stop": sandbox_ops.stop,
    "sandbox.start": sandbox_ops.start,
    "sandbox.pause": sandbox_ops.pause,
    "sandbox.resume": sandbox_ops.resume,
    "sandbox.snapshot": sandbox_ops.snapshot,
    "sandbox.destroy": sandbox_ops.destroy,
    "exec.run": process_ops.exec_run,
    "proc.start": process_ops.proc_start,
    "proc.attach": process_ops.proc_attach,
    "proc.wait": process_ops.proc_wait,
    "proc.info": process_ops.proc_info,
}


def handle(sup: Supervisor, ctx: RequestContext) -> Reply:
    op = ctx.op
    if op in FORWARDED_OPS:
        return _forward(sup, ctx)
    if op in NETWORK_OPS:
        return sup.network.handle(ctx)
    handler = HANDLERS.get(op)
    if handler is None:
        raise errors.UnknownOp(f"unknown operation {op!r}",
                               allowed=sorted([*HANDLERS, *FORWARDED_OPS, *NETWORK_OPS]))
    return handler(sup, ctx)


def _forward(sup: Supervisor, ctx: RequestContext) -> Reply:
    sup.require_state(ctx.op, "running", auto_resume=bool(ctx.args.pop("auto_resume", False)))
    audit = ctx.op not in UNAUDITED_OPS
    try:
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
    args = {k: v for k, v in ctx.args.items() if k not in ("env",)}
    if ctx.payload:
        args["payload"] = ctx.payload
    return args
