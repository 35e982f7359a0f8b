"""The module Inspect's ``inspect_ai`` entry point loads: importing it registers ``mvm``."""

from .environment import MvmSandboxEnvironment

__all__ = ["MvmSandboxEnvironment"]
