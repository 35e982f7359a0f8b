"""Fixtures for the microVM backend tests: real QEMU (TCG here), the real agent, a real template."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MVM_TEMPLATES", "/var/tmp/mvm-test-templates")

from mvm.backends.base import NetworkPolicy, Resources, SandboxSpec
from mvm.backends.vm import VmBackend, VmInstance
from mvm.templates.image import TemplateImage

TEMPLATE = "python-3.13"


def _vm_unavailable() -> str:
    status = VmBackend().availability()
    return "" if status.ok else status.reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if "backends/vm/" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.vm)
        if reason is None:
            reason = _vm_unavailable()
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"vm backend unavailable: {reason}"))


@pytest.fixture(scope="session")
def vm_template() -> TemplateImage:
    """The python-3.13 template (built once, cached under MVM_TEMPLATES)."""
    from mvm.templates import ensure_template

    return ensure_template(TEMPLATE)


def instances_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where test sandboxes keep their state (overlays, sockets, logs)."""
    root = tmp_path_factory.getbasetemp() / "vm"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def make_instance(vm_template: TemplateImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    Callable[..., VmInstance]
]:
    """Create VmInstances under a short state dir; every one is destroyed at session end."""
    made: list[VmInstance] = []
    root = instances_root(tmp_path_factory)

    def make(
        template: TemplateImage | None = None,
        ready: bool = False,
        cpu_cores: float = 1,
        memory_mb: int = 256,
        rootfs_size_mb: int = 1024,
    ) -> VmInstance:
        sandbox_id = uuid.uuid4().hex[:12]
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            template=template or vm_template,
            resources=Resources(cpu_cores=cpu_cores, memory_mb=memory_mb, rootfs_size_mb=rootfs_size_mb),
            network=NetworkPolicy(),
            state_dir=root / sandbox_id,
        )
        instance = VmBackend(use_ready_snapshots=ready).create(spec)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.destroy()
    shutil.rmtree(root, ignore_errors=True)
