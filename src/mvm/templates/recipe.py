"""What a template is made of, and its content hash.

A ``Recipe`` is pure data: a Debian suite, the packages to install, pip
packages, and files to copy in. Its ``recipe_digest`` is the sha256 of a
canonical JSON form of that data plus ``BUILD_FORMAT``; a built template's
``digest`` adds the guest agent's source digest (``template_digest``).

Custom templates are declared in a small TOML file (DESIGN §4)::

    name = "data-tools"                  # [a-z0-9][a-z0-9.-]{0,40}
    suite = "bookworm"                   # bookworm or trixie
    packages = ["python3", "python3-pip", "jq"]
    pip_packages = ["six==1.17.0"]       # installed with the template's pip (needs network at build time)
    description = "Python with jq"

    [files]                              # guest path = source (relative to this TOML file)
    "/app/config.ini" = "config.ini"
    "/usr/local/bin/tool" = { source = "tool.sh", mode = "0755" }
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InvalidArgument

#: Bump when the build procedure changes what ends up in a rootfs (mmdebstrap
#: options, the finishing steps): every template digest changes with it.
BUILD_FORMAT = 2

#: Debian suites reachable from the mirror, with the Python and Node.js they ship.
SUITES: dict[str, dict[str, str]] = {
    "bookworm": {"debian": "12", "python": "3.11", "nodejs": "18"},
    "trixie": {"debian": "13", "python": "3.13", "nodejs": "20"},
}

NAME_PATTERN = r"[a-z0-9][a-z0-9.-]{0,40}"
_NAME_RE = re.compile(NAME_PATTERN)
# Debian package names (policy §5.6.1), optionally pinned: "nodejs" or "nodejs=20.19.2+dfsg-1".
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?")
# A pip requirement, conservatively: a project name, extras, version clauses, markers. Never an option.
_PIP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._, -]+\])?[A-Za-z0-9 .,<>=!~*+;:'\"_()-]*")

#: Guest paths a custom file may not replace: the agent and kernel-provided trees.
_FORBIDDEN_DEST_PREFIXES = ("/opt/mvm", "/proc", "/sys", "/dev", "/run")
MAX_FILES_BYTES = 64 * 1024 * 1024
MAX_PACKAGES = 500
_TOML_FIELDS = ("name", "suite", "packages", "pip_packages", "files", "description")


@dataclass(frozen=True)
class TemplateFile:
    """A file copied into the rootfs after the packages: its content is part of the digest."""

    dest: str  # absolute guest path
    content: bytes
    mode: int = 0o644

    def canonical(self) -> dict[str, Any]:
        return {"dest": self.dest, "mode": self.mode, "sha256": hashlib.sha256(self.content).hexdigest()}


@dataclass(frozen=True)
class Recipe:
    """How to build one template. ``packages`` are installed on top of Debian's essential set."""

    name: str
    suite: str
    packages: tuple[str, ...]
    pip_packages: tuple[str, ...] = ()
    files: tuple[TemplateFile, ...] = ()
    description: str = ""
    builtin: bool = False
    source: str = field(default="", compare=False)  # the TOML file a custom recipe came from

    def canonical(self) -> dict[str, Any]:
        """The part of the recipe that decides the rootfs's content (the name does not)."""
        return {
            "suite": self.suite,
            "packages": sorted(set(self.packages)),
            "pip_packages": sorted(set(self.pip_packages)),
            "files": sorted((f.canonical() for f in self.files), key=lambda f: f["dest"]),
        }

    @property
    def recipe_digest(self) -> str:
        """sha256 of the canonical recipe and ``BUILD_FORMAT``, without the agent."""
        return _sha256_json({"format": BUILD_FORMAT, "recipe": self.canonical()})

    def to_json(self) -> dict[str, Any]:
        """Everything needed to rebuild this recipe later (stored as ``recipe.json``)."""
        return {
            "name": self.name,
            "suite": self.suite,
            "packages": list(self.packages),
            "pip_packages": list(self.pip_packages),
            "files": [
                {"dest": f.dest, "mode": f.mode, "content_b64": base64.b64encode(f.content).decode()}
                for f in self.files
            ],
            "description": self.description,
            "builtin": self.builtin,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        return cls(
            name=str(data["name"]),
            suite=str(data["suite"]),
            packages=tuple(data["packages"]),
            pip_packages=tuple(data.get("pip_packages", ())),
            files=tuple(
                TemplateFile(f["dest"], base64.b64decode(f["content_b64"]), int(f["mode"]))
                for f in data.get("files", ())
            ),
            description=str(data.get("description", "")),
            builtin=bool(data.get("builtin", False)),
            source=str(data.get("source", "")),
        )


def template_digest(recipe: Recipe, agent_digest: str) -> str:
    """The content hash of a built template: recipe + build format + guest agent sources."""
    return _sha256_json({"format": BUILD_FORMAT, "recipe": recipe.canonical(), "agent": agent_digest})


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- custom templates ---------------------------------------------------------


def load_custom(path: str | Path, *, reserved: frozenset[str] = frozenset()) -> Recipe:
    """Read and validate a custom template's TOML file.

    Raises ``InvalidArgument`` naming the offending field (``name``, ``suite``,
    ``packages``, ``pip_packages``, ``files`` or ``files."<dest>"``) and what is allowed.
    ``python3-minimal`` is always added to ``packages`` (the mvm agent runs on it) and
    ``python3-pip`` when ``pip_packages`` is not empty.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArgument("template", f"no such TOML file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument("template", f"{path} is not valid TOML: {exc}") from None
    return recipe_from_mapping(data, base_dir=path.parent, source=str(path), reserved=reserved)


def recipe_from_mapping(
    data: dict[str, Any], *, base_dir: Path, source: str = "", reserved: frozenset[str] = frozenset()
) -> Recipe:
    """Validate an already-parsed custom template declaration (see ``load_custom``)."""
    unknown = sorted(set(data) - set(_TOML_FIELDS))
    if unknown:
        raise InvalidArgument(unknown[0], "unknown field in a template declaration", allowed=list(_TOML_FIELDS))

    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgument("name", f"{name!r} is not a valid template name", allowed=NAME_PATTERN)
    if name in reserved:
        raise InvalidArgument("name", f"{name!r} is reserved for a built-in template",
                              allowed=f"{NAME_PATTERN}, not one of {sorted(reserved)}")

    suite = data.get("suite")
    if suite not in SUITES:
        raise InvalidArgument("suite", f"{suite!r} is not a Debian suite mvm can build", allowed=sorted(SUITES))
    assert isinstance(suite, str)

    packages = _string_list(data, "packages", _PACKAGE_RE, "Debian package names like 'nodejs' or 'jq=1.6-2.1'")
    pip_packages = _string_list(data, "pip_packages", _PIP_RE, "pip requirements like 'six==1.17.0'")
    if len(packages) > MAX_PACKAGES:
        raise InvalidArgument("packages", f"{len(packages)} packages", allowed=f"at most {MAX_PACKAGES}")
    if "python3-minimal" not in packages:
        packages.append("python3-minimal")
    if pip_packages and "python3-pip" not in packages:
        packages.append("python3-pip")

    description = data.get("description", "")
    if not isinstance(description, str):
        raise InvalidArgument("description", "must be a string")

    return Recipe(
        name=name,
        suite=suite,
        packages=tuple(packages),
        pip_packages=tuple(pip_packages),
        files=_files(data.get("files", {}), base_dir),
        description=description,
        source=source,
    )


def _string_list(data: dict[str, Any], key: str, pattern: re.Pattern[str], allowed: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise InvalidArgument(key, "must be a list of strings", allowed=allowed)
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or len(item) > 200 or not pattern.fullmatch(item):
            raise InvalidArgument(key, f"{item!r} is not allowed", allowed=allowed)
        if item not in out:
            out.append(item)
    return out


def _files(value: Any, base_dir: Path) -> tuple[TemplateFile, ...]:
    if not isinstance(value, dict):
        raise InvalidArgument("files", 'must be a table of "/guest/path" = "source" entries')
    files: list[TemplateFile] = []
    total = 0
    for dest, spec in value.items():
        where = f'files."{dest}"'
        clean = PurePosixPath(dest) if isinstance(dest, str) else None
        if (
            clean is None
            or not dest.startswith("/")
            or ".." in clean.parts
            or str(clean) in ("/", ".")
            or "\0" in dest
        ):
            raise InvalidArgument(where, "the guest path must be absolute, without '..'", allowed="/dir/file")
        dest = str(clean)
        if any(dest == p or dest.startswith(p + "/") for p in _FORBIDDEN_DEST_PREFIXES):
            raise InvalidArgument(where, "this guest path is managed by mvm or the kernel",
                                  allowed=f"any path outside {', '.join(_FORBIDDEN_DEST_PREFIXES)}")
        mode = 0o644
        if isinstance(spec, dict):
            extra = sorted(set(spec) - {"source", "mode"})
            if extra:
                raise InvalidArgument(f"{where}.{extra[0]}", "unknown key", allowed=["source", "mode"])
            mode = _mode(spec.get("mode", "0644"), f"{where}.mode")
            spec = spec.get("source")
        if not isinstance(spec, str) or not spec:
            raise InvalidArgument(where, "needs a source file path (relative to the TOML file)")
        source = base_dir / spec
        if not source.is_file():
            raise InvalidArgument(where, f"source {str(source)!r} is not a regular file")
        content = source.read_bytes()
        total += len(content)
        if total > MAX_FILES_BYTES:
            raise InvalidArgument("files", "the files are too large", allowed=f"{MAX_FILES_BYTES} bytes in all")
        files.append(TemplateFile(dest, content, mode))
    return tuple(files)


def _mode(value: Any, where: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
        mode = int(value, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise InvalidArgument(where, f"{value!r} is not a file mode", allowed='an octal string like "0755"')
    if not 0 <= mode <= 0o7777:
        raise InvalidArgument(where, f"{value!r} is not a file mode", allowed='an octal string like "0755"')
    return mode
