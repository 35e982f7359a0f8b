"""Errors a user can act on. Everything mvm raises on purpose derives from ``MvmError``.

Each error that concerns bad input names the field and the allowed values.
Errors that cross the protocol carry a ``type`` string (docs/protocol.md) and
are rebuilt here by ``from_wire``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from .protocol.shown import kind_of as kind_of
from .protocol.shown import shown as shown


class MvmError(Exception):
    """Base class of every mvm error."""

    wire_type = "Internal"

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.wire_type, "message": self.message, **_jsonable(self.details)}


# ---- input and policy -------------------------------------------------------


class InvalidArgument(MvmError, ValueError):
    """A parameter has a value outside what is allowed; ``field`` names it."""

    wire_type = "InvalidArgument"

    def __init__(self, field: str, message: str, allowed: Any = None):
        text = f"{field}: {message}"
        if allowed is not None:
            text += f" (allowed: {allowed if isinstance(allowed, str) else shown(allowed)})"
        super().__init__(text, field=field, allowed=allowed)
        self.field = field
        self.allowed = allowed


class InvalidNetworkPolicy(InvalidArgument):
    wire_type = "InvalidNetworkPolicy"


class ConnectionRefused(MvmError, ConnectionError):
    """The guest refused a connection a port forward or stream asked for (nothing listens)."""

    wire_type = "ConnectionRefused"


class NameTaken(InvalidArgument):
    """Another sandbox on this host has the name a create asked for (``field`` is ``name``;
    ``details["sandbox_id"]`` is the holder's id)."""

    wire_type = "NameTaken"

    def __init__(self, field: str, message: str, allowed: Any = None, sandbox_id: str | None = None):
        super().__init__(field, message, allowed)
        self.details["sandbox_id"] = sandbox_id
        self.sandbox_id = sandbox_id


class PortInUse(InvalidArgument):
    """The host address and port a port forward asked for are already taken."""

    wire_type = "PortInUse"


class TemplateNotFound(MvmError, LookupError):
    """The template cannot be built on this host; ``available`` lists those that can."""

    wire_type = "TemplateNotFound"

    def __init__(self, name: str, available: list[str], reason: str = ""):
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"template {name!r} cannot be built here{why}; available templates: {', '.join(available)}",
            name=name,
            available=available,
        )
        self.name = name
        self.available = available


class TemplateBuildError(MvmError):
    wire_type = "TemplateBuildError"


class ImageError(TemplateBuildError):
    """A template from an OCI image or a Dockerfile could not be made; ``image`` names it."""

    wire_type = "ImageError"


class ImageNotFound(ImageError, LookupError):
    """The registry has no such repository, or no such tag/digest in it."""

    wire_type = "ImageNotFound"


class RegistryUnavailable(ImageError):
    """The registry could not be reached (refused, no such host, timed out)."""

    wire_type = "RegistryUnavailable"


class RegistryAuthError(ImageError):
    """The registry refused the credentials (or asked for some and none were given)."""

    wire_type = "RegistryAuthError"


class ImagePlatformMismatch(ImageError):
    """The image is built for another OS/architecture than this host's; ``allowed`` is the host's."""

    wire_type = "ImagePlatformMismatch"


class DockerfileStepFailed(ImageError):
    """A Dockerfile instruction failed; ``step`` is the instruction, ``index`` its number (1-based)."""

    wire_type = "DockerfileStepFailed"


class SecretNotFound(MvmError, LookupError):
    """A ``mvm.secret(name)`` reference has no value in the keystore or environment."""

    wire_type = "SecretNotFound"

    def __init__(self, name: str, hint: str = ""):
        super().__init__(f"secret {name!r} is not set{': ' + hint if hint else ''}", name=name)
        self.name = name


class BackendUnavailable(MvmError):
    wire_type = "BackendUnavailable"


# ---- sandbox lifecycle ------------------------------------------------------


class SandboxNotFound(MvmError, LookupError):
    wire_type = "SandboxNotFound"


class InvalidState(MvmError):
    """The operation is not allowed in the sandbox's current state."""

    wire_type = "InvalidState"


class SandboxPaused(InvalidState):
    wire_type = "SandboxPaused"


class SandboxError(MvmError):
    """The sandbox (or its supervisor) failed; ``details`` says what was seen."""

    wire_type = "SandboxError"


class SandboxLost(SandboxError):
    """The sandbox's supervisor died (or, in a cluster, the node that ran it is gone):
    it is listed with state ``lost`` until ``mvm.gc()`` / ``mvmctl gc`` removes what it left."""

    wire_type = "SandboxLost"


class NoCapacity(MvmError):
    """No cluster node can take the sandbox (limits, template, backend); ``details``
    says what each node answered."""

    wire_type = "NoCapacity"


class NotAvailableInRecordMode(MvmError):
    wire_type = "NotAvailableInRecordMode"


class SnapshotNotFound(MvmError, LookupError):
    wire_type = "SnapshotNotFound"


class SnapshotTampered(MvmError):
    wire_type = "SnapshotTampered"


# ---- commands ---------------------------------------------------------------


class CommandError(MvmError):
    """Raised by ``commands.run(..., check=True)`` for a non-zero exit."""

    wire_type = "CommandError"

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


class CommandTimeout(MvmError, TimeoutError):
    """The command ran past its timeout; its process group was killed.

    ``stdout``/``stderr`` hold what it printed before that.
    """

    wire_type = "CommandTimeout"

    def __init__(self, message: str, stdout: str = "", stderr: str = "", **details: Any):
        super().__init__(message, **details)
        self.stdout = stdout
        self.stderr = stderr


class StreamIdle(SandboxError, TimeoutError):
    """A stream (process output, logs) sent nothing for ``idle_timeout`` seconds; the
    request was cancelled. Raised on the client side only (readers given ``idle_timeout``:
    ``logs``, ``Process.output``/``lines`` of ``Sandbox`` and ``AsyncSandbox``)."""

    wire_type = "StreamIdle"


class ProcessNotFound(MvmError, LookupError):
    wire_type = "ProcessNotFound"


class UserNotFound(InvalidArgument):
    """``user=NAME`` (``commands.run``, ``files.*``) named a user the guest does not have."""

    wire_type = "UserNotFound"


# ---- files ------------------------------------------------------------------


class FileError(MvmError, OSError):
    """Base of errors about a guest path; ``path`` names it."""

    def __init__(self, message: str, path: str = "", **details: Any):
        MvmError.__init__(self, message, path=path, **details)
        self.path = path

    def __str__(self) -> str:
        return self.message


# The builtin OSError subclasses are bases too, so ``except FileNotFoundError`` (what
# frameworks such as Inspect expect of a sandbox) catches a guest path's error.
class FileNotFoundInSandbox(FileError, FileNotFoundError):
    wire_type = "FileNotFound"


class NotADirectory(FileError, NotADirectoryError):
    wire_type = "NotADirectory"


class IsADirectory(FileError, IsADirectoryError):
    wire_type = "IsADirectory"


class FileExistsInSandbox(FileError, FileExistsError):
    wire_type = "FileExists"


class DirectoryNotEmpty(FileError):
    wire_type = "DirectoryNotEmpty"


class PermissionDenied(FileError, PermissionError):
    wire_type = "PermissionDenied"


class TooLarge(MvmError):
    wire_type = "TooLarge"


class ProtocolFailure(MvmError):
    """The peer broke the framed protocol or the channel closed unexpectedly."""

    wire_type = "Protocol"


class Cancelled(MvmError):
    wire_type = "Cancelled"


class UnknownOp(MvmError):
    wire_type = "UnknownOp"


_E = TypeVar("_E", bound=BaseException)


def _all_subclasses(cls: type[_E]) -> list[type[_E]]:
    out: list[type[_E]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def from_wire(error: dict[str, Any]) -> MvmError:
    """Rebuild the right exception class from a protocol ``error`` object."""
    wire_type = str(error.get("type", "Internal"))
    message = str(error.get("message", wire_type))
    details = {k: v for k, v in error.items() if k not in ("type", "message")}
    classes: list[type[MvmError]] = [MvmError, *_all_subclasses(MvmError)]
    for cls in classes:
        if getattr(cls, "wire_type", None) != wire_type:
            continue
        if issubclass(cls, FileError):
            return cls(message, **details)
        if cls is CommandTimeout:
            return CommandTimeout(message, **details)
        exc = cls.__new__(cls)
        MvmError.__init__(exc, message, **details)
        for key, value in details.items():
            setattr(exc, key, value)
        return exc
    return MvmError(message, **details)


# ---- security (keystore, audit) ---------------------------------------------


class KeystoreError(MvmError):
    """The secrets keystore or a host key cannot be used (corrupt file, wrong key)."""

    wire_type = "KeystoreError"


class AuditError(MvmError):
    """An audit log cannot be appended to or read."""

    wire_type = "AuditError"


class AuditEntryNotFound(AuditError, LookupError):
    """No audit entry has the ``audit_id`` asked for."""

    wire_type = "AuditEntryNotFound"
