"""mvm: disposable, policy-bound sandboxes for untrusted code on your own Linux host.

>>> import mvm
>>> with mvm.Sandbox.create("python-3.13", resources=mvm.resources(memory_mb=512)) as sandbox:
...     sandbox.files.write("/app/main.py", "print('hello from mvm')")
...     result = sandbox.commands.run(["python", "/app/main.py"], timeout_seconds=30)
...     print(result.exit_code, result.stdout, result.audit_id)
"""

from typing import TYPE_CHECKING

from .lazy_exports import lazy_exports

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
#: Submodules that are part of the public surface: ``mvm.errors.X`` right after ``import mvm``.
_SUBMODULES = ("errors",)
__all__ = sorted(_LAZY)


if TYPE_CHECKING:  # type checkers and IDEs see the same names as plain imports ("X as X": re-exported)
    from . import errors as errors
    from .errors import (
        CommandError as CommandError,
        CommandTimeout as CommandTimeout,
        FileNotFoundInSandbox as FileNotFoundInSandbox,
        InvalidArgument as InvalidArgument,
        InvalidNetworkPolicy as InvalidNetworkPolicy,
        InvalidState as InvalidState,
        MvmError as MvmError,
        NameTaken as NameTaken,
        NotADirectory as NotADirectory,
        PermissionDenied as PermissionDenied,
        PortInUse as PortInUse,
        SandboxLost as SandboxLost,
        SandboxNotFound as SandboxNotFound,
        SandboxPaused as SandboxPaused,
        SecretNotFound as SecretNotFound,
        SnapshotTampered as SnapshotTampered,
        StreamIdle as StreamIdle,
        TemplateNotFound as TemplateNotFound,
        UserNotFound as UserNotFound,
    )
    from .sdk.async_sandbox import AsyncProcess as AsyncProcess, AsyncSandbox as AsyncSandbox
    from .sdk.commands import Process as Process
    from .sdk.models import (
        CommandResult as CommandResult,
        FileEntry as FileEntry,
        LogEvent as LogEvent,
        PortForward as PortForward,
        ProcessInfo as ProcessInfo,
        SandboxInfo as SandboxInfo,
    )
    from .snapshots.model import Snapshot as Snapshot
    from .sdk.policy import network as network, resources as resources, secret as secret
    from .sdk.pool import Pool as Pool, PoolInfo as PoolInfo, pool as pool, pools as pools
    from .cluster import connect_cluster as connect_cluster
    from .sdk.sandbox import Sandbox as Sandbox, gc as gc
else:
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY, _SUBMODULES)
