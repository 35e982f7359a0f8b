"""``fs.read`` served by the supervisor: a whole file streamed to the client as ``data``
frames (stream ``file``) in one call, audited once.

The guest side stays the agent's chunk op (``fs.read`` with ``offset``/``length``, at most
``CHUNK_SIZE``; the first chunk by path with ``keep_open``, the next by the handle it
answers with, closed with ``fs.read_close`` at the end: one open -- one child forked for
``user`` -- per call), asked ahead: up to ``READ_AHEAD`` chunks are in flight while the
previous one goes out to the client, so the agent, this process and the client work at once.
The supervisor asks for the next chunk only once it handed a chunk to the client's socket:
a client that stops reading blocks this request's thread in its send, and at most
``READ_AHEAD`` chunks wait in memory. A cancel (or the connection closing) ends the read
between chunks; chunks still in flight are dropped when they arrive.

``max_bytes`` is enforced here, the trust boundary: a regular file whose size says it is
larger fails before any byte is sent, and a file that grows past it while being read
(or one whose size the guest does not know, like ``/proc`` files) fails as soon as a chunk
takes the total over it. The audit entry is written (fdatasync'ed) after the first chunk
answered and before its bytes reach the client: no guest byte leaves before the read is on
record, and the record says whether the file could be opened (a missing file, a directory,
a file over the limit are recorded as errors, with their type).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from .. import errors
from ..protocol import CHUNK_SIZE
from ..protocol.requests import DEFAULT_MAX_READ_BYTES
from .agent_link import PendingCall

if TYPE_CHECKING:
    from .server import Supervisor
    from .session import Reply, RequestContext

#: Agent chunk reads in flight per streamed ``fs.read`` (memory bound: this many chunks).
READ_AHEAD = 4
#: The ``data`` stream a file's bytes travel on.
FILE_STREAM = "file"


def too_large(path: str, max_bytes: int, size: Any) -> errors.TooLarge:
    return errors.TooLarge(f"{path} is larger than max_bytes={max_bytes}", path=path, max_bytes=max_bytes, size=size)


def read(sup: Supervisor, ctx: RequestContext) -> Reply:
    path = ctx.arg.path()
    max_bytes = ctx.arg.integer("max_bytes", DEFAULT_MAX_READ_BYTES, minimum=1)
    user = ctx.arg.string("user", max_length=256)  # every chunk is opened as it (the agent checks it)
    as_user = {} if user is None else {"user": user}
    audit_args = {"path": path, "max_bytes": max_bytes, **as_user}
    ahead: deque[PendingCall] = deque()
    # The first chunk asks the agent to keep the file open; the next ones read it by the
    # handle its answer gives (one open -- one child forked for ``user`` -- per call).
    source: dict[str, Any] = {"path": path, "keep_open": True, **as_user}

    def ask(offset: int) -> None:
        ahead.append(sup.agent.submit("fs.read", {**source, "offset": offset, "length": CHUNK_SIZE}))

    sent = 0
    audit_id: str | None = None
    try:
        ask(0)
        asked = CHUNK_SIZE
        while True:
            result, payload = ahead.popleft().wait()
            if "handle" in result:
                source = {"handle": result["handle"]}
            size = result.get("size")
            if (isinstance(size, int) and size > max_bytes) or sent + len(payload) > max_bytes:
                raise too_large(path, max_bytes, size)
            eof = bool(result.get("eof")) or not payload
            if audit_id is None:  # on record before the first byte leaves
                audit_id = sup.audit.record("fs.read", audit_args, details={"size": size})
            if not eof:  # one chunk always in flight; READ_AHEAD up to the size the file said it has
                known = size if isinstance(size, int) else 0
                while not ahead or (len(ahead) < READ_AHEAD and asked < known):
                    ask(asked)
                    asked += CHUNK_SIZE
            if payload:
                if ctx.cancelled.is_set():
                    raise errors.Cancelled(f"fs.read of {path} was cancelled")
                ctx.send_data(FILE_STREAM, payload)
                sent += len(payload)
            if eof:
                return {"size": sent, "audit_id": audit_id}, b""
    except errors.MvmError as exc:
        if audit_id is None:
            sup.audit.record("fs.read", audit_args, outcome="error", error_type=exc.wire_type)
        raise
    finally:
        for call in ahead:
            call.forget()
        if "handle" in source:  # the agent closes it once the chunk reads still running are done
            try:
                sup.agent.submit("fs.read_close", source).forget()
            except errors.MvmError:
                pass  # no agent connection: its handles went with it
