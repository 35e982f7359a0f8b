"""Placement order from node reports (pure: no Ray, no sandboxes)."""

from __future__ import annotations

import pytest

from mvm import errors
from mvm.cluster.placement import NodeReport, SandboxRequest, rank


def node(node_id: str, *, sandboxes: int = 0, templates: tuple[str, ...] = ("python-3.13",),
         backends: tuple[str, ...] = ("namespace", "vm"), max_sandboxes: int | None = None) -> NodeReport:
    return NodeReport(
        node_id=node_id, home=f"/srv/{node_id}", backends=list(backends), templates=list(templates),
        sandboxes=sandboxes, cpu_used=sandboxes * 1.0, memory_used_mb=sandboxes * 512, cpu_limit=8.0,
        memory_limit_mb=8192, max_sandboxes=max_sandboxes, memory_available_mb=8192, load_average=0.0,
    )


REQUEST = SandboxRequest("python-3.13", None, 1.0, 512)


def order(reports: list[NodeReport], strategy: str, request: SandboxRequest = REQUEST) -> list[str]:
    return [r.node_id for r in rank(reports, request, strategy)[0]]


def test_spread_prefers_the_emptiest_and_pack_the_fullest_that_fits() -> None:
    reports = [node("a", sandboxes=3), node("b", sandboxes=1), node("c", sandboxes=8)]  # c is at its cpu limit
    assert order(reports, "spread") == ["b", "a"]
    assert order(reports, "pack") == ["a", "b"]
    assert rank(reports, REQUEST, "spread")[1] == {"c": "cpu_cores 8+1 > limit 8"}


def test_locality_puts_nodes_holding_the_template_first() -> None:
    reports = [node("a", templates=()), node("b", sandboxes=5), node("c", templates=("node-20",))]
    assert order(reports, "locality") == ["b", "a", "c"]


def test_backend_and_count_limits_exclude_nodes_with_their_reason() -> None:
    reports = [node("a", backends=("namespace",)), node("b", sandboxes=2, max_sandboxes=2), node("c")]
    ordered, refused = rank(reports, SandboxRequest("python-3.13", "vm", 1.0, 512), "spread")
    assert [r.node_id for r in ordered] == ["c"]
    assert "backend 'vm' not available" in refused["a"] and "max_sandboxes=2" in refused["b"]


def test_an_unknown_strategy_names_the_allowed_ones() -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        rank([node("a")], REQUEST, "random")
    assert caught.value.details["allowed"] == ["locality", "spread", "pack"]
