"""Inspect's own portable sandbox conformance suite (``inspect_ai.util._sandbox.self_check``),
imported as it ships, against ``--sandbox mvm`` on each backend.

One sandbox per backend is shared by the checks (as Inspect's own runner does), made and
removed through the adapter's ``sample_init``/``sample_cleanup``.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

pytest.importorskip("inspect_ai", reason="the inspect extra is not installed (pip install -e '.[test]')")

from inspect_ai.util._sandbox.self_check import *  # noqa: F403  (the checks, collected here)

import mvm
from mvm.integrations.inspect_ai import MvmSandboxConfig, MvmSandboxEnvironment

pytestmark = pytest.mark.anyio

#: Checks this provider cannot satisfy, with why. The sandbox's default user is root (as in
#: Inspect's docker provider with a root image): root reads and writes a file whatever its mode
#: bits, so "chmod -r/-w, then expect PermissionError" cannot hold for root.
ROOT_IGNORES_MODE_BITS = (
    "the default user is root, whom file mode bits do not stop (a root docker image behaves the same); "
    "mvm's file operations run as the guest agent's root"
)
KNOWN_GAPS = {
    "test_read_file_not_allowed": ROOT_IGNORES_MODE_BITS,
    "test_write_text_file_without_permissions": ROOT_IGNORES_MODE_BITS,
    "test_write_binary_file_without_permissions": ROOT_IGNORES_MODE_BITS,
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def mvm_environment(backend: str) -> Iterator[MvmSandboxEnvironment]:
    config = MvmSandboxConfig(backend=backend, ttl="20m")  # type: ignore[arg-type]
    anyio.run(MvmSandboxEnvironment.task_init, "self-check", config)
    environments = anyio.run(MvmSandboxEnvironment.sample_init, "self-check", config, {})
    environment = environments["default"]
    assert isinstance(environment, MvmSandboxEnvironment)
    assert environment.sandbox.describe().backend == backend
    yield environment
    anyio.run(MvmSandboxEnvironment.sample_cleanup, "self-check", config, environments, False)
    assert environment.sandbox.id not in [info.id for info in mvm.Sandbox.list()]


@pytest.fixture
def sandbox_env(mvm_environment: MvmSandboxEnvironment, request: pytest.FixtureRequest) -> MvmSandboxEnvironment:
    reason = KNOWN_GAPS.get(request.node.originalname)
    if reason is not None:
        request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    return mvm_environment
