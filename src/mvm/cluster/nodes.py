"""The node agent as a Ray actor class (imported only where Ray is installed)."""

from __future__ import annotations

from typing import Any

import ray

from .agent import NodeAgent

NodeAgentActor: Any = ray.remote(NodeAgent)
