"""mvm: disposable, policy-bound sandboxes for untrusted code on your own Linux host.

>>> import mvm
>>> with mvm.Sandbox.create("python-3.13", resources=mvm.resources(memory_mb=512)) as sandbox:
...     sandbox.files.write("/app/main.py", "print('hello from mvm')")
...     result = sandbox.commands.run(["python", "/app/main.py"], timeout_seconds=30)
...     print(result.exit_code, result.stdout, result.audit_id)
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names are loaded on first use (PEP 562), so importing one submodule (the
# supervisor, the CLI) does not pay for the whole SDK.
_LAZY = {
    "AsyncProcess": "mvm.sdk.async_sandbox",
    "AsyncSandbox": "mvm.sdk.async_sandbox",
    "CommandError": "mvm.errors",
    "CommandResult": "mvm.sdk.models",
    "CommandTimeout": "mvm.errors",
    "FileEntry": "mvm.sdk.models",
    "FileNotFoundInSandbox": "mvm.errors",
    "InvalidArgument": "mvm.errors",
    "InvalidNetworkPolicy": "mvm.errors",
    "InvalidState": "mvm.errors",
    "LogEvent": "mvm.sdk.models",
    "NameTaken": "mvm.errors",
    "MvmError": "mvm.errors",
    "NotADirectory": "mvm.errors",
    "PermissionDenied": "mvm.errors",
    "Pool": "mvm.sdk.pool",
    "PoolInfo": "mvm.sdk.pool",
    "PortForward": "mvm.sdk.models",
    "PortInUse": "mvm.errors",
    "Process": "mvm.sdk.commands",
    "ProcessInfo": "mvm.sdk.models",
    "Sandbox": "mvm.sdk.sandbox",
    "SandboxInfo": "mvm.sdk.models",
    "SandboxLost": "mvm.errors",
    "SandboxNotFound": "mvm.errors",
    "UserNotFound": "mvm.errors",
    "SandboxPaused": "mvm.errors",
    "SecretNotFound": "mvm.errors",
    "Snapshot": "mvm.snapshots.model",
    "StreamIdle": "mvm.errors",
    "SnapshotTampered": "mvm.errors",
    "TemplateNotFound": "mvm.errors",
    "connect_cluster": "mvm.cluster",
    "gc": "mvm.sdk.sandbox",
    "network": "mvm.sdk.policy",
    "pool": "mvm.sdk.pool",
    "pools": "mvm.sdk.pool",
    "resources": "mvm.sdk.policy",
    "secret": "mvm.sdk.policy",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    # ruff: noqa: F401
    from .errors import (
        CommandError,
        CommandTimeout,
        FileNotFoundInSandbox,
        InvalidArgument,
        InvalidNetworkPolicy,
        InvalidState,
        MvmError,
        NameTaken,
        NotADirectory,
        PermissionDenied,
        PortInUse,
        SandboxLost,
        SandboxNotFound,
        SandboxPaused,
        SecretNotFound,
        SnapshotTampered,
        StreamIdle,
        TemplateNotFound,
    )
    from .sdk.async_sandbox import AsyncProcess, AsyncSandbox
    from .sdk.commands import Process
    from .sdk.models import CommandResult, FileEntry, LogEvent, PortForward, ProcessInfo, SandboxInfo
    from .snapshots.model import Snapshot
    from .sdk.policy import network, resources, secret
    from .sdk.pool import Pool, PoolInfo, pool, pools
    from .cluster import connect_cluster
    from .sdk.sandbox import Sandbox, gc
