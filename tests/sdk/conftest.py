"""Backend conformance: every SDK test runs on each backend this machine can run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import mvm
from mvm.backends import PREFERENCE, availability

TEMPLATE = "python-3.13"


def _available() -> list[str]:
    names = [name for name in PREFERENCE if availability(name).ok]
    return names or ["namespace"]  # let the tests fail loudly rather than silently pass


@pytest.fixture(scope="module", params=_available())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def sandbox(backend: str) -> Iterator[mvm.Sandbox]:
    """One sandbox shared by a module's read-mostly tests (booting a TCG VM per test
    would dominate the suite); tests that change lifecycle make their own."""
    with mvm.Sandbox.create(
        TEMPLATE, backend=backend, ttl="20m", resources=mvm.resources(cpu_cores=1, memory_mb=512)
    ) as sb:
        yield sb
