"""``AsyncSandbox`` has the surface of ``Sandbox``: every public method of the sync
handle and its sub-objects exists on the async one with the same parameters (names,
kinds, defaults), and the reverse. A method added to one side only fails here; a
difference that is meant is listed below with its reason."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from mvm.sdk.async_sandbox import AsyncCommands, AsyncFiles, AsyncNetwork, AsyncPorts, AsyncProcess, AsyncSandbox
from mvm.sdk.commands import Commands, Process
from mvm.sdk.files import Files
from mvm.sdk.network import Network, Ports
from mvm.sdk.sandbox import Sandbox

PAIRS = [
    (Sandbox, AsyncSandbox),
    (Commands, AsyncCommands),
    (Process, AsyncProcess),
    (Files, AsyncFiles),
    (Ports, AsyncPorts),
    (Network, AsyncNetwork),
]

#: The context-manager protocol differs by nature.
PROTOCOL_TWINS = {"__enter__": "__aenter__", "__exit__": "__aexit__"}

#: A sync property that asks the sandbox becomes an awaited method (a property cannot await).
PROPERTY_TO_METHOD = {("Sandbox", "state"), ("Process", "exit_code")}

#: (class, method) -> {parameter: reason} for parameters only one side has.
ONLY_SYNC = {
    ("Sandbox", "create"): {
        "mode": "record/plan of async scripts is the recording transport's (AsyncSandbox refuses non-live modes)",
        "cluster": "mvm.cluster relays are a sync transport",
    },
    ("Sandbox", "connect"): {"cluster": "mvm.cluster relays are a sync transport"},
    ("Sandbox", "list"): {"cluster": "mvm.cluster relays are a sync transport"},
}
ONLY_ASYNC: dict[tuple[str, str], dict[str, str]] = {}


def _public(cls: type) -> dict[str, Any]:
    protocol = {*PROTOCOL_TWINS, *PROTOCOL_TWINS.values()} & set(dir(cls))
    names = {n for n in dir(cls) if not n.startswith("_")} | protocol
    return {n: inspect.getattr_static(cls, n) for n in names}


def _parameters(member: Any) -> dict[str, tuple[Any, Any]]:
    function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    if isinstance(function, property):
        function = function.fget
    return {
        name: (p.kind, p.default)
        for name, p in inspect.signature(function).parameters.items()
        if name not in ("self", "cls")
    }


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_async_twin_has_the_same_methods_and_parameters(sync_cls: type, async_cls: type) -> None:
    sync_members, async_members = _public(sync_cls), _public(async_cls)
    expected = {PROTOCOL_TWINS.get(name, name) for name in sync_members}
    assert set(async_members) == expected, (
        f"only on {sync_cls.__name__}: {sorted(expected - set(async_members))}; "
        f"only on {async_cls.__name__}: {sorted(set(async_members) - expected)}"
    )
    for name, sync_member in sync_members.items():
        async_member = async_members[PROTOCOL_TWINS.get(name, name)]
        assert isinstance(sync_member, classmethod) == isinstance(async_member, classmethod), name

        if isinstance(sync_member, property) and (sync_cls.__name__, name) in PROPERTY_TO_METHOD:
            assert inspect.iscoroutinefunction(async_member), f"{async_cls.__name__}.{name} must be awaited"
        else:
            assert isinstance(sync_member, property) == isinstance(async_member, property), name
        if isinstance(async_member, property):
            continue
        function = async_member.__func__ if isinstance(async_member, classmethod) else async_member
        if name not in PROTOCOL_TWINS and name != "__repr__":
            assert inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function), (
                f"{async_cls.__name__}.{name} blocks: it must be a coroutine or an async generator"
            )

        sync_params, async_params = _parameters(sync_member), _parameters(async_member)
        if name in PROTOCOL_TWINS:
            assert list(sync_params) == list(async_params)
            continue
        for param in ONLY_SYNC.get((sync_cls.__name__, name), {}):
            assert param in sync_params and param not in async_params, (name, param)
            del sync_params[param]
        for param in ONLY_ASYNC.get((async_cls.__name__, name), {}):
            assert param in async_params and param not in sync_params, (name, param)
            del async_params[param]
        assert sync_params == async_params, f"{name}: {sync_params} != {async_params}"


def test_every_listed_difference_is_still_a_difference() -> None:
    """The allow-lists above cannot outlive the differences they excuse."""
    classes = {cls.__name__: cls for pair in PAIRS for cls in pair}
    for table in (ONLY_SYNC, ONLY_ASYNC):
        for (cls_name, method), params in table.items():
            present = _parameters(inspect.getattr_static(classes[cls_name], method))
            assert set(params) <= set(present), (cls_name, method)
    for cls_name, name in PROPERTY_TO_METHOD:
        assert isinstance(inspect.getattr_static(classes[cls_name], name), property)
