"""The agent's source digest (part of every template's content hash) is cached by the
files' stat, so a create does not read and hash them; any edit still shows, even one
made within the same timestamp tick as the digest that came before it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from mvm.agent import install


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the guest packages the digest is taken over, settled (changed longer ago
    than the cache's racy window, shortened here to 0.2 s), so its digest is cached."""
    root = tmp_path / "mvm"
    for package in install._GUEST_PACKAGES:
        shutil.copytree(install._PACKAGE_ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    old = time.time() - 60
    for path in root.rglob("*.py"):
        os.utime(path, (old, old))
    monkeypatch.setattr(install, "_PACKAGE_ROOT", root)
    monkeypatch.setattr(install, "_cached", None)
    monkeypatch.setattr(install, "_SETTLED_NS", 200_000_000)
    time.sleep(0.3)  # the copy's ctimes (which utime cannot set back) settle
    return root


def _uncached() -> str:
    install._cached = None
    return install.source_digest()


def test_the_cached_digest_is_the_files_digest(sources: Path) -> None:
    first = install.source_digest()
    assert install._cached is not None and install._cached[1] == first  # settled files: cached
    assert install.source_digest() == first == _uncached()


def test_an_edit_of_the_same_size_and_mtime_changes_the_digest(sources: Path) -> None:
    before = install.source_digest()
    target = sources / "agent" / "server.py"
    st = target.stat()
    text = target.read_bytes()
    target.write_bytes(text.replace(b"import", b"IMPORT", 1))  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: ctime still moves
    after = install.source_digest()
    assert after != before and after == _uncached()


def test_a_file_edited_just_now_is_never_taken_from_the_cache(sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install, "_SETTLED_NS", 60_000_000_000)  # the default's 2 s, and then some
    target = sources / "agent" / "server.py"
    text = target.read_bytes()
    target.write_bytes(text + b"# one\n")
    fresh = install.source_digest()
    assert install._cached is None  # too fresh to vouch for: not cached
    st = target.stat()
    target.write_bytes(text + b"# two\n")  # within the same tick, same size, same times
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert install.source_digest() != fresh


def test_an_added_or_removed_file_changes_the_digest(sources: Path) -> None:
    before = install.source_digest()
    extra = sources / "protocol" / "extra.py"
    extra.write_text("X = 1\n")
    old = time.time() - 60
    os.utime(extra, (old, old))
    with_extra = install.source_digest()
    assert with_extra != before
    extra.unlink()
    assert install.source_digest() == before
