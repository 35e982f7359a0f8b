"""Inspect's own portable sandbox conformance suite (``inspect_ai.util._sandbox.self_check``),
imported as it ships, against ``--sandbox mvm`` on each backend.

One sandbox per backend is shared by the checks (as Inspect's own runner does), made and
removed through the adapter's ``sample_init``/``sample_cleanup``. Its default user is a
non-root account (``MvmSandboxConfig.user``), which ``sample_init`` creates with its home as
the working directory: file mode bits bind it, so every check holds -- no xfails.
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

#: The sandbox's default user: not in the template, so sample_init creates it.
USER = "inspect"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def mvm_environment(backend: str) -> Iterator[MvmSandboxEnvironment]:
    config = MvmSandboxConfig(backend=backend, user=USER, ttl="20m")  # type: ignore[arg-type]
    anyio.run(MvmSandboxEnvironment.task_init, "self-check", config)
    environments = anyio.run(MvmSandboxEnvironment.sample_init, "self-check", config, {})
    environment = environments["default"]
    assert isinstance(environment, MvmSandboxEnvironment)
    assert environment.sandbox.describe().backend == backend
    who = anyio.run(environment.exec, ["sh", "-c", 'id -un; pwd; stat -c %U .'])  # exec's default user and cwd
    assert who.stdout == f"{USER}\n/home/{USER}\n{USER}\n"
    yield environment
    anyio.run(MvmSandboxEnvironment.sample_cleanup, "self-check", config, environments, False)
    assert environment.sandbox.id not in [info.id for info in mvm.Sandbox.list()]


@pytest.fixture
def sandbox_env(mvm_environment: MvmSandboxEnvironment) -> MvmSandboxEnvironment:
    return mvm_environment
