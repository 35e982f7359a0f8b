"""Adapters that make mvm a sandbox provider for agent and eval frameworks.

Each lives in its own subpackage, imports its framework, and is installed with its
extra: ``mvm[inspect]`` (``inspect_ai/``), ``mvm[deepagents]`` (``deepagents/``).
They use only the public SDK (``mvm.Sandbox``, ``commands.run``, ``files.*``);
what they share is here and in ``common.py``.
"""
