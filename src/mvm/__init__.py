"""mvm: disposable, policy-bound sandboxes for untrusted code on your own Linux host.

>>> import mvm
>>> with mvm.Sandbox.create("python-3.13", resources=mvm.resources(memory_mb=512)) as sandbox:
...     sandbox.files.write("/app/main.py", "print('hello from mvm')")
...     result = sandbox.commands.run(["python", "/app/main.py"], timeout_seconds=30)
...     print(result.exit_code, result.stdout, result.audit_id)
"""

from .errors import (
    CommandError,
    CommandTimeout,
    FileNotFoundInSandbox,
    InvalidArgument,
    InvalidNetworkPolicy,
    InvalidState,
    MvmError,
    NotADirectory,
    PermissionDenied,
    SandboxNotFound,
    SandboxPaused,
    SecretNotFound,
    SnapshotTampered,
    TemplateNotFound,
)
from .sdk.commands import Process
from .sdk.models import CommandResult, FileEntry, LogEvent, PortForward, ProcessInfo, SandboxInfo, Snapshot
from .sdk.policy import network, resources, secret
from .sdk.sandbox import Sandbox

__version__ = "0.1.0"

__all__ = [
    "CommandError",
    "CommandResult",
    "CommandTimeout",
    "FileEntry",
    "FileNotFoundInSandbox",
    "InvalidArgument",
    "InvalidNetworkPolicy",
    "InvalidState",
    "LogEvent",
    "MvmError",
    "NotADirectory",
    "PermissionDenied",
    "PortForward",
    "Process",
    "ProcessInfo",
    "Sandbox",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxPaused",
    "SecretNotFound",
    "Snapshot",
    "SnapshotTampered",
    "TemplateNotFound",
    "network",
    "resources",
    "secret",
]
