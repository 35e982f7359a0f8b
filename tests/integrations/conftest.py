"""Framework adapters run against real sandboxes on every backend this machine can run."""

from __future__ import annotations

import pytest

from mvm.backends import PREFERENCE, availability


def available_backends() -> list[str]:
    names = [name for name in PREFERENCE if availability(name).ok]
    return names or ["namespace"]  # let the tests fail loudly rather than silently pass


@pytest.fixture(scope="module", params=available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
