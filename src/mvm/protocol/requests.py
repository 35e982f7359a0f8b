"""Limits of the wire requests, defined once: the supervisor enforces them (the trust
boundary: the Python SDK, the TypeScript SDK and raw clients all talk to it), the SDK
uses them as defaults, and record/plan mode checks a recorded ``exec.run`` against the
same bounds so a script fails in ``mvmctl compile`` exactly as it would live.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import errors
from ..errors import shown

#: Default capture per stream for ``exec.run`` / ``commands.run``.
DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
#: Largest ``max_output_bytes`` an ``exec.run`` may ask for.
MAX_OUTPUT_LIMIT = 256 * 1024 * 1024
#: Default bound of ``fs.read`` / ``files.read`` (``max_bytes``).
DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024
#: ``user`` of the file operations mvm does for itself -- the supervisor's
#: ``/etc/resolv.conf``, ``include=`` copies -- whatever account the template's image makes
#: the default of commands and files: the agent's own (uid 0 in every backend).
AGENT_USER = "0"


def check_run_limits(args: Mapping[str, Any]) -> tuple[int, float | None]:
    """``exec.run``: ``max_output_bytes`` in ``1..MAX_OUTPUT_LIMIT`` (default
    :data:`DEFAULT_MAX_OUTPUT_BYTES`), ``timeout_seconds`` positive and finite or
    ``None``. Returns ``(cap, timeout)``."""
    cap = args.get("max_output_bytes")
    if cap is None:
        cap = DEFAULT_MAX_OUTPUT_BYTES
    if isinstance(cap, bool) or not isinstance(cap, int) or not 0 < cap <= MAX_OUTPUT_LIMIT:
        raise errors.InvalidArgument("max_output_bytes", f"{shown(cap)} is out of range",
                                     allowed=f"1..{MAX_OUTPUT_LIMIT}")
    timeout = args.get("timeout_seconds")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not timeout > 0
        or timeout == float("inf")
    ):
        raise errors.InvalidArgument("timeout_seconds", f"{shown(timeout)} must be a positive number")
    return cap, None if timeout is None else float(timeout)


def check_user(user: Any) -> None:
    """``user`` of ``commands.run``/``commands.start`` and the file operations: a guest
    account name or uid, or ``None`` (the agent's default). Whether the guest has it is
    the guest's to say (``UserNotFound``)."""
    if user is not None and (not isinstance(user, str) or not user or "\0" in user):
        raise errors.InvalidArgument("user", f"{shown(user)} is not a user name", allowed="a guest user name or uid")
