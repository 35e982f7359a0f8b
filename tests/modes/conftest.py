"""Fixtures for the record/plan/live tests: scripts on disk, a private MVM_HOME per
record/plan test (so "nothing was created" is checkable), and a readiness probe for
the live tests."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from modes_helpers import CANARY, REPO


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty MVM_HOME for this test (templates still come from MVM_TEMPLATES)."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("MVM_HOME", str(path))
    for key in [k for k in os.environ if k.startswith("MVM_SECRET_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("MVM_MODE", raising=False)
    monkeypatch.delenv("MVM_RECORDING", raising=False)
    return path


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[..., Path]:
    """write_script(body, name="script.py", src=True): a script in its own folder, with a
    src/ folder beside it (for include=["src"])."""

    def write(body: str, name: str = "script.py", src: bool = True) -> Path:
        folder = tmp_path / "project"
        folder.mkdir(exist_ok=True)
        if src:
            (folder / "src").mkdir(exist_ok=True)
            (folder / "src" / "util.py").write_text("VALUE = 42\n")
        path = folder / name
        path.write_text(textwrap.dedent(body).lstrip())
        return path

    return write


@pytest.fixture
def seed_copy(tmp_path: Path) -> Path:
    """examples/ copied elsewhere (so tests never write beside the real example)."""
    dest = tmp_path / "examples"
    shutil.copytree(REPO / "examples", dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "seed_example.py"


_live_status: dict[str, str] = {}


@pytest.fixture(scope="session")
def live_ready() -> None:
    """Skip (with the reason) unless a namespace sandbox from python-3.13 really starts here."""
    if "reason" not in _live_status:
        try:
            import mvm

            with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="3m", mode="live") as sb:
                result = sb.commands.run(["python", "-c", "print(6*7)"], timeout_seconds=60)
                if result.stdout.strip() != "42":
                    raise RuntimeError(f"probe command printed {result.stdout!r}")
            _live_status["reason"] = ""
        except Exception as exc:  # any failure means the live stack is not ready on this host
            _live_status["reason"] = (f"live stack not ready (namespace backend, python-3.13): "
                                      f"{type(exc).__name__}: {exc}")
    if _live_status["reason"]:
        pytest.skip(_live_status["reason"])


@pytest.fixture
def live_env(live_ready: None) -> Iterator[dict[str, str]]:
    """Env for live subprocesses: the session's MVM_HOME, the namespace backend, the secret set."""
    yield {"MVM_BACKEND": "namespace", "MVM_SECRET_API_KEY": CANARY}
