"""LangChain's standard sandbox suite (``langchain_tests.integration_tests.SandboxIntegrationTests``),
unmodified and with no overrides, against ``MvmSandboxBackend`` on each backend: one sandbox
per backend, shared by the suite's class (its own ``scope="class"`` contract)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("deepagents", reason="the deepagents extra is not installed (pip install -e '.[test]')")

from langchain_tests.integration_tests import SandboxIntegrationTests

import mvm
from mvm.integrations.deepagents import MvmSandboxBackend

from mvm.backends import availability

pytestmark = pytest.mark.anyio  # the suite's async tests are plain coroutines


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _standard_suite_on(backend: str) -> type[SandboxIntegrationTests]:
    """The suite bound to one backend. A class per backend rather than a parametrized fixture:
    the suite names each test's directory after the test node, and a "[vm]" suffix would be
    read as a glob character class by its glob checks."""

    class Suite(SandboxIntegrationTests):
        @pytest.fixture(scope="class")
        def sandbox(self) -> Iterator[MvmSandboxBackend]:
            sandbox_backend = MvmSandboxBackend.create(backend=backend, ttl="20m")
            assert sandbox_backend.sandbox.describe().backend == backend
            try:
                yield sandbox_backend
            finally:
                sandbox_backend.close()
            assert sandbox_backend.id not in [info.id for info in mvm.Sandbox.list()]

    return Suite


TestMvmSandboxOnNamespace = _standard_suite_on("namespace")
if availability("vm").ok:
    TestMvmSandboxOnVm = _standard_suite_on("vm")
