"""Errors the agent answers with, and validation of request arguments.

Every failure a handler reports is an ``AgentError``: its ``type`` is one of the
error types of docs/protocol.md, its details (``path``, ``pid``, ``field``,
``allowed``) travel in the response's ``error`` object. ``Args`` reads a
request's ``args`` object and names the offending field when a value is wrong.
"""

from __future__ import annotations

import errno
import math
import os
from typing import Any, Literal, overload

from ..protocol.shown import shown

#: errno -> protocol error type, for OSErrors raised by file and process operations.
_ERRNO_TYPES = {
    errno.ENOENT: "FileNotFound",
    errno.ENOTDIR: "NotADirectory",
    errno.EISDIR: "IsADirectory",
    errno.EEXIST: "FileExists",
    errno.ENOTEMPTY: "DirectoryNotEmpty",
    errno.EACCES: "PermissionDenied",
    errno.EPERM: "PermissionDenied",
    errno.EROFS: "PermissionDenied",
    errno.ETXTBSY: "PermissionDenied",
    errno.ENOSPC: "TooLarge",
    errno.EDQUOT: "TooLarge",
    errno.EFBIG: "TooLarge",
    errno.ENAMETOOLONG: "InvalidArgument",
    errno.EINVAL: "InvalidArgument",
    errno.ELOOP: "InvalidArgument",
    errno.ENXIO: "InvalidArgument",
    errno.ENOEXEC: "InvalidArgument",
}


class AgentError(Exception):
    """A failure reported to the host as ``{"ok": false, "error": {...}}``."""

    def __init__(self, error_type: str, message: str, **details: Any):
        super().__init__(message)
        self.type = error_type
        self.message = message
        self.details = {key: value for key, value in details.items() if value is not None}


def invalid(field: str, message: str, allowed: Any = None) -> AgentError:
    """An ``InvalidArgument`` naming the request field (and, if known, what it accepts)."""
    return AgentError("InvalidArgument", f"{field}: {message}", field=field, allowed=allowed)


def from_os_error(exc: OSError, path: str | None = None) -> AgentError:
    """Map an OSError to the protocol's error types, naming the path involved."""
    code = exc.errno if exc.errno is not None else 0
    error_type = _ERRNO_TYPES.get(code, "Internal")
    where = path if path is not None else exc.filename
    if isinstance(where, bytes):
        where = os.fsdecode(where)
    reason = exc.strerror or str(exc)
    message = f"{reason}: {where}" if where is not None else reason
    return AgentError(error_type, message, path=where, errno=errno.errorcode.get(code))


class Args:
    """Typed access to a request's ``args`` object; every mistake names its field."""

    def __init__(self, raw: Any):
        self.raw: dict[str, Any] = raw if isinstance(raw, dict) else {}

    def _get(self, name: str, required: bool) -> Any:
        value = self.raw.get(name)
        if value is None and required:
            raise invalid(name, "is required")
        return value

    def path(self, name: str = "path", *, default: str | None = None) -> str:
        """An absolute guest path (required unless ``default`` is given)."""
        value = self._get(name, default is None)
        if value is None:
            return default  # type: ignore[return-value]
        if not isinstance(value, str) or not value:
            raise invalid(name, f"must be an absolute path string, got {shown(value)}")
        if "\0" in value:
            raise invalid(name, "must not contain NUL characters")
        if not value.startswith("/"):
            raise invalid(name, f"must be an absolute path, got relative path {shown(value)}")
        try:
            os.fsencode(value)
        except UnicodeError:
            raise invalid(name, "is not encodable as a file name") from None
        return os.path.normpath(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(name, f"must be true or false, got {shown(value)}", allowed=[True, False])
        return value

    @overload
    def integer(self, name: str, default: int, *, minimum: int | None = None,
                maximum: int | None = None, required: bool = False) -> int: ...
    @overload
    def integer(self, name: str, default: None = None, *, minimum: int | None = None,
                maximum: int | None = None, required: Literal[True]) -> int: ...
    @overload
    def integer(self, name: str, default: int | None = None, *, minimum: int | None = None,
                maximum: int | None = None, required: bool = False) -> int | None: ...
    def integer(self, name: str, default: int | None = None, *, minimum: int | None = None,
                maximum: int | None = None, required: bool = False) -> int | None:
        """An integer in ``minimum..maximum``; ``default`` when absent (never ``None`` when required)."""
        value = self._get(name, required)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid(name, f"must be an integer, got {shown(value)}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            low = "" if minimum is None else str(minimum)
            high = "" if maximum is None else str(maximum)
            raise invalid(name, f"{value} is out of range", allowed=f"{low}..{high}")
        return value

    def number(self, name: str) -> float | None:
        """An optional finite int or float."""
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise invalid(name, f"must be a finite number, got {shown(value)}")
        return float(value)

    def string(self, name: str, *, required: bool = False, max_length: int = 4096) -> str | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise invalid(name, f"must be a string, got {shown(value)}")
        if len(value) > max_length:
            raise invalid(name, f"is longer than {max_length} characters")
        return value

    def mode(self, name: str = "mode") -> int | None:
        """An optional permission mode (0..0o7777)."""
        return self.integer(name, minimum=0, maximum=0o7777)

    def argv(self, name: str = "argv") -> list[str]:
        value = self._get(name, True)
        if not isinstance(value, list) or not value:
            raise invalid(name, "must be a non-empty list of strings", allowed="e.g. ['python3', '-c', 'print(1)']")
        for item in value:
            if not isinstance(item, str) or "\0" in item:
                raise invalid(name, f"every element must be a string without NUL characters, got {shown(item)}")
        if not value[0]:
            raise invalid(name, "the command (argv[0]) must not be empty")
        return list(value)

    def env(self, name: str = "env", *, allow_unset: bool = False) -> dict[str, str | None]:
        """An optional ``{name: value}`` map; with ``allow_unset`` a null value means "remove"."""
        value = self.raw.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise invalid(name, f"must be an object of strings, got {type(value).__name__}")
        result: dict[str, str | None] = {}
        for key, item in value.items():
            if not key or "=" in key or "\0" in key:
                raise invalid(name, f"{shown(key)} is not a valid environment variable name")
            if item is None and allow_unset:
                result[key] = None
                continue
            if not isinstance(item, str) or "\0" in item:
                raise invalid(name, f"the value of {shown(key)} must be a string without NUL characters")
            result[key] = item
        return result
