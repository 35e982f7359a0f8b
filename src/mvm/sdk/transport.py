"""What a ``Sandbox`` speaks through: the shape of ``SupervisorClient``.

The local path is a ``SupervisorClient`` on the sandbox's ``control.sock``; the cluster
path (``mvm.cluster``) relays the same requests to the node that owns the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

DataCallback = Callable[[str, bytes], None]


class Transport(Protocol):
    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        on_data: DataCallback | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]: ...

    def stream(self, op: str, args: dict[str, Any] | None = None) -> Iterator[tuple[str, bytes]]: ...

    def close(self) -> None: ...
