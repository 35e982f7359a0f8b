"""Template tests build real root filesystems with mmdebstrap.

Built templates are shared across test runs through ``MVM_TEMPLATES`` (a persistent
cache, ``/var/tmp/mvm-test-templates`` unless already set), so only the first run
pays for the builds. Tests that must see a build happen use ``isolated_templates``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MVM_TEMPLATES", "/var/tmp/mvm-test-templates")

from mvm.templates import TemplateImage, ensure_template



@pytest.fixture(scope="session")
def built() -> Iterator[object]:
    """``built(name)`` → the shared cache's build of ``name`` (built on first use)."""
    cache: dict[str, TemplateImage] = {}
    shared = os.environ["MVM_TEMPLATES"]

    def get(name: str) -> TemplateImage:
        if name not in cache:
            current = os.environ["MVM_TEMPLATES"]
            os.environ["MVM_TEMPLATES"] = shared  # even inside a test that isolated its own cache
            try:
                cache[name] = ensure_template(name, progress=lambda _: None)
            finally:
                os.environ["MVM_TEMPLATES"] = current
        return cache[name]

    yield get


@pytest.fixture
def isolated_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty template cache of this test's own."""
    directory = tmp_path / "templates"
    monkeypatch.setenv("MVM_TEMPLATES", str(directory))
    return directory


@pytest.fixture
def scratch_root(tmp_path: Path) -> Iterator[object]:
    """``scratch_root(image)`` → a writable view of a template's rootfs (an overlay whose
    upper layer is in tmp_path), so a test can run things in it without touching the template."""
    mounted: list[Path] = []

    def make(image: TemplateImage) -> Path:
        base = tmp_path / f"overlay-{len(mounted)}"
        upper, work, merged = base / "upper", base / "work", base / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        options = f"lowerdir={image.rootfs},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
        mounted.append(merged)
        return merged

    yield make
    for merged in reversed(mounted):
        subprocess.run(["umount", str(merged)], check=False)
