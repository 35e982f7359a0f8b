"""The sans-I/O half of a supervisor client, shared by ``SupervisorClient`` (threads)
and ``AsyncSupervisorClient`` (asyncio).

Both keep one connection and many requests in flight on it. What does not depend on how
bytes move lives here, once: the hello exchange, request ids and the table routing each
answer frame to the waiter of its request, turning an answer into ``(result, payload)``
or the mapped ``MvmError``, and the errors a client raises when the connection fails.
The two clients only add their I/O (a reader thread and ``queue.SimpleQueue`` boxes, or a
reader task and ``asyncio.Queue`` boxes).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from .. import errors
from ..osutil import stamp_alive
from ..protocol import codec
from ..protocol.codec import Frame, ProtocolError
from .state import owner_stamp

Box = TypeVar("Box")
DataCallback = Callable[[str, bytes], None]
#: One request of a ``call_many`` window (``mvm.sdk.transport``): op, args, payload.
Request = tuple[str, dict[str, Any] | None, bytes]

#: How long a supervisor may still show in /proc after its end closed our connection (the
#: kernel closes a dying process's sockets before it reaps it).
SUPERVISOR_EXIT_GRACE = 2.0


class ConnectionEnded:
    """Put into every waiting box when the connection ends (the reader saw EOF or an error).
    ``lost``: its supervisor died without destroying the sandbox (it is listed ``lost``), so
    the requests fail with ``SandboxLost``; else the sandbox was destroyed or the handle closed."""

    def __init__(self, directory: Path, lost: bool):
        self.directory = directory
        self.lost = lost

    def error(self, op: str) -> errors.SandboxError:
        """What a request still waiting when the connection ended raises."""
        if self.lost:
            return lost(op, self.directory)
        return errors.SandboxError(f"{op}: the sandbox closed the connection (it may have been destroyed)")


def supervisor_died(directory: Path, grace: float = SUPERVISOR_EXIT_GRACE) -> bool:
    """Whether the supervisor of sandbox ``directory``, which just ended a connection, died
    leaving its sandbox behind (``lost``) rather than destroying it (its directory retired
    first, so no stamp is left). Waits up to ``grace`` seconds for a dying one to go."""
    deadline = time.monotonic() + grace
    while True:
        stamp = owner_stamp(directory)
        if stamp is None:
            return False
        if not stamp_alive(stamp):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def hello(on_behalf_of: dict[str, str] | None = None) -> bytes:
    """The client's hello. ``on_behalf_of`` names who the client acts for (an MCP client,
    say); the supervisor audits it next to the connecting process's own credentials."""
    return codec.hello("client", **({"on_behalf_of": on_behalf_of} if on_behalf_of else {}))


def accept_hello(frame: Frame) -> dict[str, Any]:
    """The supervisor's hello header, or ``ProtocolFailure``."""
    try:
        return codec.check_hello(frame)
    except ProtocolError as exc:
        raise handshake_failed(exc) from None


class PendingRequests(Generic[Box]):
    """Requests in flight on one connection: each id's box (where its frames go)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._boxes: dict[int, Box] = {}

    def open(self, op: str, args: dict[str, Any] | None, payload: bytes, box: Box, *,
             window: int | None = None) -> tuple[int, codec.Encoded]:
        """Register ``box`` under a fresh id; returns the id and the encoded request (with
        ``window``: its data frames flow-controlled, see ``Grants``)."""
        ident = next(self._ids)
        self._boxes[ident] = box
        return ident, codec.request(ident, op, args, payload, window=window)

    def box_of(self, frame: Frame) -> Box | None:
        """The box waiting for ``frame`` (``None``: an answer nobody waits for any more)."""
        ident = frame.id
        return self._boxes.get(ident) if ident is not None else None

    def finish(self, ident: int) -> bool:
        """Forget a request; ``True`` if it was still registered."""
        return self._boxes.pop(ident, None) is not None

    def boxes(self) -> list[Box]:
        return list(self._boxes.values())


class Grants:
    """The credit of one flow-controlled request (docs/protocol.md, "Flow control"): it opens
    with ``WINDOW`` bytes, and ``took`` answers the bytes its reader has taken with a
    ``data.window`` grant once they make a ``GRANT_STEP``. The supervisor never sends more
    than granted, so a reader that stops taking stops the stream: what a box holds stays
    within one window, however much the process writes."""

    WINDOW = codec.STREAM_WINDOW

    def __init__(self, ident: int):
        self.ident = ident
        self._taken = 0

    def took(self, size: int) -> bytes | None:
        """The grant to send after the reader took ``size`` more bytes, or None (not yet)."""
        self._taken += size
        if self._taken < codec.GRANT_STEP:
            return None
        grant, self._taken = self._taken, 0
        return codec.event("data.window", id=self.ident, bytes=grant)


def stream_idle(op: str, idle_timeout: float | None) -> errors.StreamIdle:
    """A stream's reader waited ``idle_timeout`` seconds for a frame (the request is cancelled)."""
    return errors.StreamIdle(f"{op}: nothing from the sandbox for {idle_timeout} s", idle_timeout=idle_timeout)


def answer(op: str, item: Any, on_data: DataCallback | None) -> tuple[dict[str, Any], bytes] | None:
    """One item taken from a request's box: ``None`` for a ``data`` frame (handed to
    ``on_data``), else the request's final ``(result, payload)``; an error answer or a
    closed connection raises."""
    if isinstance(item, ConnectionEnded):
        raise item.error(op)
    frame: Frame = item
    if frame.kind == "data":
        if on_data is not None:
            on_data(frame.header["stream"], frame.payload)
        return None
    return unwrap_response(frame)


def all_answered(outcomes: list[tuple[dict[str, Any], bytes] | errors.MvmError]) -> list[
        tuple[dict[str, Any], bytes]]:
    """The answers of a ``call_many`` window, once every request was answered: the
    first error (in request order) raised, else every ``(result, payload)``."""
    answers: list[tuple[dict[str, Any], bytes]] = []
    for outcome in outcomes:
        if isinstance(outcome, errors.MvmError):
            raise outcome
        answers.append(outcome)
    return answers


def unwrap_response(frame: Frame) -> tuple[dict[str, Any], bytes]:
    """A response frame's ``(result, payload)``, or its error raised as the mapped ``MvmError``."""
    if frame.header.get("ok"):
        return dict(frame.header.get("result") or {}), frame.payload
    raise errors.from_wire(frame.header.get("error") or {})


# ---- the errors of a failing connection (one wording for both clients) -----------------------


def not_running(exc: BaseException, directory: Path) -> errors.SandboxNotFound | errors.SandboxLost:
    """Nothing listens on the control socket: ``SandboxLost`` if the supervisor died."""
    if supervisor_died(directory, grace=0):
        return lost("connect", directory)
    return errors.SandboxNotFound(f"sandbox supervisor is not running ({exc})")


def handshake_failed(exc: BaseException) -> errors.ProtocolFailure:
    return errors.ProtocolFailure(f"supervisor handshake failed: {exc}")


def no_answer(op: str, timeout: float | None) -> errors.SandboxError:
    return errors.SandboxError(f"{op}: no answer from the sandbox within {timeout} s")


def gone(op: str, directory: Path) -> errors.SandboxError:
    """A request could not be sent: ``SandboxLost`` if the supervisor died (see ``supervisor_died``)."""
    if supervisor_died(directory):
        return lost(op, directory)
    return errors.SandboxError(f"{op}: the sandbox is gone (its supervisor closed the connection)")


def lost(op: str, directory: Path) -> errors.SandboxLost:
    return errors.SandboxLost(
        f"{op}: sandbox {directory.name} is lost: its supervisor died; `mvmctl gc` (mvm.gc()) removes what it left",
        sandbox_id=directory.name, state="lost",
    )


def handle_closed() -> errors.SandboxError:
    return errors.SandboxError("this sandbox handle is closed")
