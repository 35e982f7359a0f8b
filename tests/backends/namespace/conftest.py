"""Fixtures for the namespace backend: a real template, real bwrap, cgroups and overlays.

The template is ``python-3.13`` from ``mvm.templates.ensure_template`` (cached under
``$MVM_TEMPLATES``; built once, ~25 s). Everything here talks to the real guest agent
over the socket ``start()`` returns, with the framed protocol (docs/protocol.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MVM_TEMPLATES", "/var/tmp/mvm-test-templates")

from mvm.backends.base import NetworkPolicy, Resources, SandboxSpec
from mvm.templates.image import TemplateImage
from nshelpers import Guest


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the namespace backend tests need root (overlay on tmpfs, cgroups)"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def template() -> TemplateImage:
    from mvm.templates import ensure_template

    return ensure_template("python-3.13")


@pytest.fixture
def state_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mvm-ns-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_spec(template: TemplateImage, state_root: Path):
    def make(sandbox_id: str | None = None, **resources) -> SandboxSpec:
        sid = sandbox_id or f"t{uuid.uuid4().hex[:10]}"
        return SandboxSpec(sid, template, Resources(**resources), NetworkPolicy(), state_root / sid)

    return make


@pytest.fixture
def backend():
    from mvm.backends.namespace import NamespaceBackend

    return NamespaceBackend()


@pytest.fixture
def sandbox(backend, make_spec):
    """Yields a factory ``(resources...) -> (instance, Guest)``; destroys everything after."""
    made = []

    def create(sandbox_id: str | None = None, **resources):
        inst = backend.create(make_spec(sandbox_id, **resources))
        made.append(inst)
        guest = Guest(inst.start())
        return inst, guest

    yield create
    for inst in made:
        inst.destroy()
