"""mvm as an Inspect sandbox provider: ``--sandbox mvm`` (``pip install 'mvm[inspect]'``).

Registered through the ``inspect_ai`` entry point (pyproject.toml), which imports
``mvm.integrations.inspect_ai._registry``; that module's ``@sandboxenv(name="mvm")``
class is ``MvmSandboxEnvironment``.
"""

from .environment import MvmSandboxConfig, MvmSandboxEnvironment

__all__ = ["MvmSandboxConfig", "MvmSandboxEnvironment"]
