"""mvm as a Deep Agents sandbox backend (``pip install 'mvm[deepagents]'``).

>>> from mvm.integrations.deepagents import MvmSandboxBackend
>>> backend = MvmSandboxBackend.create(backend="namespace")
>>> backend.execute("echo hi").output
'hi\\n'
"""

from .backend import MvmSandboxBackend

__all__ = ["MvmSandboxBackend"]
