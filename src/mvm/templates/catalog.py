"""The built-in templates, and how a name becomes a recipe.

Package names and versions were checked against deb.debian.org (2026-11-30):

==============  ========  =====================================================  ==========================
template        suite     packages                                               runtime
==============  ========  =====================================================  ==========================
minimal         bookworm  python3-minimal                                        Python 3.11.2
python-3.11     bookworm  python3 python3-pip python3-venv python-is-python3     Python 3.11.2, pip 23.0.1
python-3.13     trixie    python3 python3-pip python3-venv python-is-python3     Python 3.13.5, pip 25.1.1
node-18         bookworm  nodejs npm python3-minimal                             Node 18.20.4, npm 9.2.0
node-20         trixie    nodejs npm python3-minimal                             Node 20.19.2, npm 9.2.0
==============  ========  =====================================================  ==========================

``python-3.12`` (the seed's example) is in no Debian release reachable here, so asking
for it raises ``TemplateNotFound`` with the list above rather than building another
Python under that name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import TemplateNotFound
from ..paths import templates_dir
from .recipe import SUITES, Recipe
from .recipe import load_custom as _load_custom

_PYTHON = ("python3", "python3-pip", "python3-venv", "python-is-python3")
_NODE = ("nodejs", "npm", "python3-minimal")  # python3-minimal: the mvm agent's interpreter

BUILTIN: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("minimal", "bookworm", ("python3-minimal",), builtin=True,
               description="Debian 12 essential packages and python3 (for the agent) only"),
        Recipe("python-3.11", "bookworm", _PYTHON, builtin=True,
               description="Debian 12, Python 3.11 with pip and venv; `python` is python3"),
        Recipe("python-3.13", "trixie", _PYTHON, builtin=True,
               description="Debian 13, Python 3.13 with pip and venv; `python` is python3"),
        Recipe("node-18", "bookworm", _NODE, builtin=True, description="Debian 12, Node.js 18 and npm"),
        Recipe("node-20", "trixie", _NODE, builtin=True, description="Debian 13, Node.js 20 and npm"),
    )
}

#: Names users ask for that no reachable Debian suite can provide, with the reason.
UNBUILDABLE: dict[str, str] = {
    "python-3.12": "no Debian release ships Python 3.12 (bookworm has 3.11, trixie 3.13)",
    "python-3.10": "no Debian release reachable here ships Python 3.10 (bookworm has 3.11, trixie 3.13)",
    "python-3.14": "no Debian release reachable here ships Python 3.14 (bookworm has 3.11, trixie 3.13)",
    "node-22": "no Debian release reachable here ships Node.js 22 (bookworm has 18, trixie 20)",
}

RESERVED = frozenset(BUILTIN) | frozenset(UNBUILDABLE)
_BUILTIN_DIR = re.compile("(" + "|".join(re.escape(n) for n in BUILTIN) + r")-[0-9a-f]{16}")


def load_custom(path: str | Path) -> Recipe:
    """Read a custom template's TOML file (format: ``mvm.templates.recipe``).

    Bad fields raise ``InvalidArgument`` naming the field; a built-in name is refused.
    """
    return _load_custom(path, reserved=RESERVED)


def custom_recipes() -> dict[str, Recipe]:
    """Custom templates built here before (their ``recipe.json`` is kept beside the rootfs)."""
    found: dict[str, tuple[str, Recipe]] = {}
    try:
        entries = list(templates_dir().iterdir())
    except FileNotFoundError:
        return {}
    for entry in entries:
        if entry.name.startswith(".") or _BUILTIN_DIR.fullmatch(entry.name):
            continue  # a built-in's build: no need to read its recipe
        try:
            data = json.loads((entry / "recipe.json").read_text())
            built_at = json.loads((entry / "manifest.json").read_text()).get("built_at", "")
            recipe = Recipe.from_json(data)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if recipe.builtin or recipe.name in RESERVED:
            continue
        if recipe.name not in found or built_at > found[recipe.name][0]:
            found[recipe.name] = (built_at, recipe)
    return {name: recipe for name, (_, recipe) in found.items()}


def available_templates() -> list[str]:
    """Every template name this host can build: the built-in ones, custom ones built here,
    and those made here from OCI images or Dockerfiles (``oci:`` names are not listed: any
    pullable image is one)."""
    from .oci import image_template_names

    return sorted(set(BUILTIN) | set(custom_recipes()) | set(image_template_names()))


def recipe(name: str | Path) -> Recipe:
    """The recipe for a template name, or for a custom template's TOML file path.

    >>> recipe("python-3.13").suite
    'trixie'
    """
    text = str(name)
    if isinstance(name, Path) or text.endswith(".toml"):
        return load_custom(Path(text))
    if text in BUILTIN:
        return BUILTIN[text]
    custom = custom_recipes()
    if text in custom:
        return custom[text]
    available = sorted(set(BUILTIN) | set(custom))
    reason = UNBUILDABLE.get(text)
    if reason is None:
        close = closest_name(text, available)
        reason = "unknown template" + (f"; did you mean '{close}'?" if close else "")
    raise TemplateNotFound(text, available=available, reason=reason)


def closest_name(word: str, names: Iterable[str]) -> str | None:
    """The name a mistyped ``word`` most likely meant, for "did you mean" hints: the one
    fewest single-character edits away (insert, delete, replace: Levenshtein distance),
    if that is at most a third of ``word``'s length (at least 1); ties go to the first
    in sorted order. The TypeScript SDK applies the same rule (``closestName``)."""
    limit = max(1, len(word) // 3)
    best: tuple[int, str] | None = None
    for name in sorted(names):
        distance = edit_distance(word, name)
        if distance <= limit and (best is None or distance < best[0]):
            best = (distance, name)
    return best[1] if best else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character inserts, deletes and replaces."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def check_template(name: str | Path) -> object:
    """What ``ensure_template`` checks a name with, without building anything (record and
    plan modes): a recipe for a catalogue/custom name, the parsed reference for ``oci:``
    names and templates made here from images. Raises ``TemplateNotFound``/``InvalidArgument``."""
    from . import oci

    if oci.is_image_name(name):
        return oci.parse_ref(str(name))
    if isinstance(name, str) and name in oci.image_template_names():
        return name
    return recipe(name)


__all__ = [
    "BUILTIN",
    "RESERVED",
    "SUITES",
    "UNBUILDABLE",
    "available_templates",
    "check_template",
    "custom_recipes",
    "load_custom",
    "recipe",
]
