"""The seam between the SDK and whatever answers its requests.

``Sandbox``, ``Commands``, ``Files``, ``Process``, ``Ports`` and ``Network`` never
open sockets. They build wire requests with pure functions (``command_args``,
``run_options``, ``signal_args`` in ``sdk/sandbox.py`` / ``sdk/commands.py``, ``forward_args``
in ``sdk/network.py``...: an op name, a JSON-able ``args`` dict, optional payload bytes),
hand them to a :class:`Transport`, and turn the answers into models. A transport is
anything with this shape:

``call(op, args=None, payload=b"", *, on_data=None, timeout=None) -> (result, payload)``
    Send one request and block until its final answer. ``data`` frames that arrive
    before it (a command's output, a file's bytes) go to ``on_data(stream, bytes)``.
    An error answer is raised as the :mod:`mvm.errors` type it names.
``call_many(requests) -> [(result, payload), ...]``
    Send every ``(op, args, payload)`` request before waiting for any answer, then wait
    for all of them (no ``data`` frames expected); an error answer is raised (the first,
    in request order) only once every request was answered, so none is still in flight
    when the caller reacts. How ``files.write`` keeps a window of chunks in flight.
``stream(op, args=None, *, idle_timeout=None) -> Iterator[(stream, bytes)]``
    Yield the ``data`` frames of one request until its answer; closing the
    iterator early cancels the request; ``StreamIdle`` after ``idle_timeout`` seconds
    without a frame.
``close()``
    Drop the connection; the sandbox keeps running.

Implementations:

* :class:`mvm.supervisor.client.SupervisorClient` -- the live transport: the
  framed protocol over the sandbox supervisor's Unix socket.
* :class:`mvm.supervisor.async_client.AsyncSupervisorClient` -- the same shape awaited
  (``AsyncSandbox``; :class:`AsyncTransport`).
* :class:`mvm.modes.recording.RecordTransport` (and ``AsyncRecordTransport``) -- record
  and plan mode: each request is appended to the recording the IR is built from, and
  answered with a recorded result (nothing runs). The mode picks the transport; the
  SDK classes are the same in every mode.
* :mod:`mvm.cluster` -- relays the same requests to the Ray node that owns the
  sandbox (``Sandbox(..., connect=...)`` gives the handle its transport factory).

The wire vocabulary (op names, args, result fields) is the supervisor's
(``docs/protocol.md``); the supervisor validates every request (its op table), so a
transport forwards without checking again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Protocol

from ..supervisor.client_core import Request

DataCallback = Callable[[str, bytes], None]


class Transport(Protocol):
    """What the SDK sends its wire requests to (see the module docstring)."""

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        on_data: DataCallback | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]: ...

    def call_many(self, requests: Sequence[Request]) -> list[tuple[dict[str, Any], bytes]]: ...

    def stream(
        self, op: str, args: dict[str, Any] | None = None, *, idle_timeout: float | None = None
    ) -> Iterator[tuple[str, bytes]]: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """The awaited twin of :class:`Transport` (``AsyncSandbox``); ``stream`` is an async iterator."""

    async def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        on_data: DataCallback | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]: ...

    async def call_many(self, requests: Sequence[Request]) -> list[tuple[dict[str, Any], bytes]]: ...

    def stream(
        self, op: str, args: dict[str, Any] | None = None, *, idle_timeout: float | None = None
    ) -> AsyncIterator[tuple[str, bytes]]: ...

    async def aclose(self) -> None: ...
