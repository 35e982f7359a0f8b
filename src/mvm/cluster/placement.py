"""Where a new sandbox goes: node reports in, an ordered list of candidate nodes out.

Strategies (``Cluster(strategy=...)`` or ``create(..., placement=...)``):

* ``spread`` — the node with the most free room first (fewest sandboxes, then most
  free memory): fault domains stay small, noisy neighbours rare. The default for
  fleets of independent rollouts.
* ``pack`` — the fullest node that still fits first: empty nodes stay empty (they can
  be scaled away), and sandboxes that talk to each other share a host.
* ``locality`` — nodes that already hold the template first (no build, no transfer),
  spread among those; then the rest, spread. The default.

A node is a candidate only if it is alive, runs the requested backend (or any, when
none is named) and fits the request under its limits (count, CPU cores, memory MB).
The node agent checks the limits again under a lock when it creates, so two clients
placing at once cannot overshoot a node: the loser's create moves on to the next node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import errors

STRATEGIES = ("locality", "spread", "pack")
DEFAULT_STRATEGY = "locality"


@dataclass(frozen=True)
class SandboxRequest:
    template: str
    backend: str | None
    cpu_cores: float
    memory_mb: int

    @classmethod
    def of(cls, template: str, options: dict[str, Any]) -> SandboxRequest:
        from ..sdk.policy import resources as default_resources

        res = options.get("resources") or default_resources()
        return cls(template, options.get("backend"), float(res.cpu_cores), int(res.memory_mb))


@dataclass(frozen=True)
class NodeReport:
    """A node agent's view of its node (``NodeAgent.report``)."""

    node_id: str
    home: str
    backends: list[str]
    templates: list[str]
    sandboxes: int
    cpu_used: float
    memory_used_mb: int
    cpu_limit: float
    memory_limit_mb: int
    max_sandboxes: int | None
    memory_available_mb: int
    load_average: float

    def fits(self, request: SandboxRequest) -> tuple[bool, str]:
        if request.backend is not None and request.backend not in self.backends:
            return False, f"backend {request.backend!r} not available (has {self.backends})"
        if not self.backends:
            return False, "no backend available"
        if self.max_sandboxes is not None and self.sandboxes >= self.max_sandboxes:
            return False, f"{self.sandboxes} of max_sandboxes={self.max_sandboxes} running"
        if self.cpu_used + request.cpu_cores > self.cpu_limit:
            return False, f"cpu_cores {self.cpu_used:g}+{request.cpu_cores:g} > limit {self.cpu_limit:g}"
        if self.memory_used_mb + request.memory_mb > self.memory_limit_mb:
            return False, f"memory_mb {self.memory_used_mb}+{request.memory_mb} > limit {self.memory_limit_mb}"
        return True, ""

    def room(self) -> float:
        """Free fraction of the tighter of CPU and memory (1.0 = empty)."""
        cpu = 1 - self.cpu_used / self.cpu_limit if self.cpu_limit else 0.0
        memory = 1 - self.memory_used_mb / self.memory_limit_mb if self.memory_limit_mb else 0.0
        return min(cpu, memory)


def validate_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise errors.InvalidArgument("placement", f"unknown placement strategy {strategy!r}", allowed=list(STRATEGIES))
    return strategy


def rank(reports: list[NodeReport], request: SandboxRequest, strategy: str) -> tuple[list[NodeReport], dict[str, str]]:
    """Candidate nodes, best first, and why each other node was left out (node id -> reason)."""
    validate_strategy(strategy)
    fitting: list[NodeReport] = []
    refused: dict[str, str] = {}
    for report in reports:
        ok, reason = report.fits(request)
        if ok:
            fitting.append(report)
        else:
            refused[report.node_id] = reason
    if strategy == "pack":
        ordered = sorted(fitting, key=lambda r: (-r.sandboxes, r.room(), r.node_id))
    elif strategy == "spread":
        ordered = sorted(fitting, key=lambda r: (r.sandboxes, -r.room(), r.node_id))
    else:
        ordered = sorted(
            fitting, key=lambda r: (request.template not in r.templates, r.sandboxes, -r.room(), r.node_id)
        )
    return ordered, refused
