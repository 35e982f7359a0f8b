"""Template names, recipes, digests and custom TOML declarations (no builds here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mvm.agent import install as agent_install
from mvm.errors import InvalidArgument, TemplateNotFound
from mvm.templates import Recipe, TemplateFile, available_templates, current_digest, load_custom, recipe
from mvm.templates.builder import debian_mirror, mmdebstrap_command
from mvm.templates.progress import mmdebstrap_phase

BUILTIN = ["minimal", "node-18", "node-20", "python-3.11", "python-3.13"]


def test_builtin_templates_are_available_and_sorted() -> None:
    names = available_templates()
    assert set(BUILTIN) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["python-3.12", "no-such-template", "ubuntu"])
def test_unbuildable_name_raises_template_not_found_listing_available(name: str) -> None:
    with pytest.raises(TemplateNotFound) as caught:
        recipe(name)
    error = caught.value
    assert error.name == name
    assert error.available == sorted(error.available)
    assert set(BUILTIN) <= set(error.available)
    assert name not in error.available
    assert "python-3.13" in str(error)


def test_python_3_12_says_why_and_is_never_substituted() -> None:
    with pytest.raises(TemplateNotFound) as caught:
        recipe("python-3.12")
    assert "3.12" in str(caught.value) and "bookworm has 3.11, trixie 3.13" in str(caught.value)
    assert caught.value.to_wire()["available"] == caught.value.available


def test_misspelt_name_suggests_the_close_one() -> None:
    with pytest.raises(TemplateNotFound, match=r"did you mean 'python-3\.13'"):
        recipe("pyhton-3.13")


def test_builtin_recipes() -> None:
    assert recipe("python-3.13").suite == "trixie"
    assert recipe("python-3.11").suite == "bookworm"
    assert {"python3-pip", "python3-venv", "python-is-python3"} <= set(recipe("python-3.13").packages)
    assert recipe("minimal").packages == ("python3-minimal",)
    for name in ("node-18", "node-20"):
        assert {"nodejs", "npm", "python3-minimal"} <= set(recipe(name).packages)


# ---- digests -------------------------------------------------------------------


def test_digest_is_stable_within_and_across_processes() -> None:
    here = current_digest(recipe("python-3.13"))
    assert here == current_digest(recipe("python-3.13"))
    code = "from mvm.templates import current_digest, recipe; print(current_digest(recipe('python-3.13')))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == here
    assert len(here) == 64


def _r(**changes: object) -> Recipe:
    base: dict[str, object] = {"name": "x", "suite": "bookworm", "packages": ("python3-minimal", "jq"),
                               "pip_packages": ("six==1.17.0",), "files": (TemplateFile("/etc/a", b"one"),)}
    base.update(changes)
    return Recipe(**base)  # type: ignore[arg-type]


def test_digest_ignores_package_order_duplicates_and_the_name() -> None:
    assert current_digest(_r()) == current_digest(_r(packages=("jq", "python3-minimal", "jq")))
    assert current_digest(_r()) == current_digest(_r(name="y"))


@pytest.mark.parametrize("change", [
    {"suite": "trixie"},
    {"packages": ("python3-minimal", "jq", "curl")},
    {"pip_packages": ("six==1.16.0",)},
    {"files": (TemplateFile("/etc/a", b"two"),)},
    {"files": (TemplateFile("/etc/a", b"one", 0o755),)},
    {"files": (TemplateFile("/etc/b", b"one"),)},
])
def test_digest_changes_when_the_recipe_changes(change: dict[str, object]) -> None:
    assert current_digest(_r()) != current_digest(_r(**change))
    assert _r().recipe_digest != _r(**change).recipe_digest


def test_digest_changes_when_the_agent_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    before = current_digest(_r())
    monkeypatch.setattr(agent_install, "source_digest", lambda: "0" * 64)
    assert current_digest(_r()) != before
    assert _r().recipe_digest == _r().recipe_digest  # the recipe part alone does not move


# ---- custom TOML declarations --------------------------------------------------------


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "template.toml"
    path.write_text(text)
    return path


def test_custom_toml_gives_a_recipe(tmp_path: Path) -> None:
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (tmp_path / "conf.ini").write_text("[x]\n")
    recipe_ = load_custom(_toml(tmp_path, """
name = "my-tools.v2"
suite = "trixie"
packages = ["jq"]
pip_packages = ["six==1.17.0"]
description = "jq and six"
[files]
"/app/conf.ini" = "conf.ini"
"/usr/local/bin/tool" = { source = "tool.sh", mode = "0755" }
"""))
    assert recipe_.name == "my-tools.v2" and recipe_.suite == "trixie"
    assert recipe_.packages == ("jq", "python3-minimal", "python3-pip")  # the agent's python, and pip for pip_packages
    assert recipe_.pip_packages == ("six==1.17.0",)
    files = {f.dest: f for f in recipe_.files}
    assert files["/usr/local/bin/tool"].mode == 0o755 and files["/usr/local/bin/tool"].content.startswith(b"#!")
    assert files["/app/conf.ini"].mode == 0o644
    assert recipe(str(tmp_path / "template.toml")) == recipe_  # a TOML path is a template name too


@pytest.mark.parametrize(("text", "field"), [
    ('name = "Bad_Name"\nsuite = "bookworm"', "name"),
    ('name = "-x"\nsuite = "bookworm"', "name"),
    ('name = "' + "a" * 42 + '"\nsuite = "bookworm"', "name"),
    ('suite = "bookworm"', "name"),
    ('name = "python-3.13"\nsuite = "trixie"', "name"),
    ('name = "python-3.12"\nsuite = "trixie"', "name"),
    ('name = "x"\nsuite = "jammy"', "suite"),
    ('name = "x"', "suite"),
    ('name = "x"\nsuite = "bookworm"\npackages = "jq"', "packages"),
    ('name = "x"\nsuite = "bookworm"\npackages = ["jq; rm -rf /"]', "packages"),
    ('name = "x"\nsuite = "bookworm"\npackages = ["Upper"]', "packages"),
    ('name = "x"\nsuite = "bookworm"\npip_packages = ["--index-url=http://evil"]', "pip_packages"),
    ('name = "x"\nsuite = "bookworm"\npip_packages = [3]', "pip_packages"),
    ('name = "x"\nsuite = "bookworm"\nextra = 1', "extra"),
    ('name = "x"\nsuite = "bookworm"\ndescription = 1', "description"),
    ('name = "x"\nsuite = "bookworm"\nfiles = ["a"]', "files"),
    ('name = "x"\nsuite = "bookworm"\n[files]\n"etc/x" = "a.txt"', 'files."etc/x"'),
    ('name = "x"\nsuite = "bookworm"\n[files]\n"/etc/../x" = "a.txt"', 'files."/etc/../x"'),
    ('name = "x"\nsuite = "bookworm"\n[files]\n"/opt/mvm/bin/mvm-agent" = "a.txt"', 'files."/opt/mvm/bin/mvm-agent"'),
    ('name = "x"\nsuite = "bookworm"\n[files]\n"/etc/x" = "missing.txt"', 'files."/etc/x"'),
    ('name = "x"\nsuite = "bookworm"\n[files]\n"/etc/x" = { source = "a.txt", mode = "rwx" }', 'files."/etc/x".mode'),
    ('name = "x"\nsuite = "bookworm"\n[files]\n"/etc/x" = { source = "a.txt", owner = 1 }', 'files."/etc/x".owner'),
    ('name = "x"\nsuite = ', "template"),
])
def test_custom_toml_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(InvalidArgument) as caught:
        load_custom(_toml(tmp_path, text))
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ":")


def test_missing_toml_file_is_an_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no such TOML file"):
        recipe(str(tmp_path / "nope.toml"))


def test_suite_error_lists_the_allowed_suites(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_custom(_toml(tmp_path, 'name = "x"\nsuite = "sid"'))
    assert caught.value.allowed == ["bookworm", "trixie"]


# ---- build command and mirror ----------------------------------------------------------


def test_mirror_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MVM_DEBIAN_MIRROR", raising=False)
    assert debian_mirror() == "http://deb.debian.org/debian"
    monkeypatch.setenv("MVM_DEBIAN_MIRROR", "http://mirror.example/debian")
    argv = mmdebstrap_command(recipe("minimal"), Path("/x/rootfs"), debian_mirror(), None)
    assert argv[-3:] == ["bookworm", "/x/rootfs", "http://mirror.example/debian"]
    assert "--include=python3-minimal" in argv and "--variant=essential" in argv
    monkeypatch.setenv("MVM_DEBIAN_MIRROR", "not a url")
    with pytest.raises(InvalidArgument) as caught:
        debian_mirror()
    assert caught.value.field == "MVM_DEBIAN_MIRROR"


@pytest.mark.parametrize(("line", "phase"), [
    ("I: downloading packages with apt...", "downloading packages"),
    ("I: installing remaining packages inside the chroot...", "installing packages"),
    ("I: some future phase...", "some future phase"),
    ("I: chroot architecture amd64 is equal to the host's architecture", None),
    ("Get:1 http://deb.debian.org/debian bookworm InRelease", None),
])
def test_mmdebstrap_output_is_read_as_phases(line: str, phase: str | None) -> None:
    assert mmdebstrap_phase(line) == phase


def test_terminal_progress_shows_a_live_line_and_a_closing_summary(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mvm.templates import progress

    monkeypatch.setattr(progress, "_stderr_is_tty", lambda: True)
    with progress.BuildReporter("building template python-3.13 (trixie, 4 packages)") as reporter:
        assert reporter._live is not None  # rich display, not plain lines
        reporter.phase("downloading packages")
        reporter.done("built template python-3.13 in 1.0s (123 MiB)")
    err = capsys.readouterr().err
    assert "built template python-3.13 in 1.0s (123 MiB)" in err
    assert "mvm: building template" not in err


def test_caller_progress_callback_gets_each_phase_once() -> None:
    from mvm.templates.progress import BuildReporter

    seen: list[str] = []
    with BuildReporter("building template x", seen.append) as reporter:
        reporter.phase("downloading packages")
        reporter.phase("downloading packages")
        reporter.phase("installing packages")
    assert seen == ["building template x: starting", "building template x: downloading packages",
                    "building template x: installing packages"]


@pytest.mark.parametrize(("word", "meant"), [
    ("python-3.1", "python-3.11"), ("pyhton-3.13", "python-3.13"), ("node20", "node-20"), ("minimal", "minimal"),
    ("ruby-3.3", None), ("x", None), ("", None),
])
def test_closest_name_is_a_small_edit_away_or_none(word: str, meant: str | None) -> None:
    from mvm.templates.catalog import closest_name

    assert closest_name(word, ["minimal", "node-20", "python-3.11", "python-3.13"]) == meant
