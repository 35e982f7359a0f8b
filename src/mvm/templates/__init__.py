"""Templates: the Debian root filesystems sandboxes start from (DESIGN §4).

Built on the host with ``mmdebstrap``, with the mvm guest agent under ``/opt/mvm``,
cached by content hash under ``$MVM_TEMPLATES`` (default ``$MVM_HOME/templates``)::

    from mvm.templates import ensure_template

    image = ensure_template("python-3.13")   # builds once (~15-40 s), then returns at once
    image.rootfs                              # .../python-3.13-<digest16>/rootfs
    image.python_version                      # '3.13.5'

Built-in names: ``available_templates()``. Templates from OCI images and Dockerfiles:
``ensure_template("oci:REGISTRY/REPO:TAG")``, ``build_from_image``, ``build_from_dockerfile``
(``mvm.templates.oci``). A custom template is a TOML file
(``load_custom``, format in ``mvm.templates.recipe``); pass its path to
``ensure_template``, and once built it is also known by its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

# The catalog, recipe format and image handle load eagerly (a create checks its template
# name with them); the builder, OCI and disk code load on first use (PEP 562), so the
# backends, ``import mvm`` and ``mvmctl`` start-up do not pay for them. Imported in this
# order, ``recipe`` names the catalog's function (not the ``recipe`` submodule).
from .catalog import available_templates, check_template, load_custom, recipe
from .image import TemplateImage
from .recipe import BUILD_FORMAT, Recipe, TemplateFile

_LAZY = {
    "ProgressCallback": "mvm.templates.progress",
    "TemplateHold": "mvm.templates.builder",
    "build_from_dockerfile": "mvm.templates.oci",
    "build_from_image": "mvm.templates.oci",
    "build_raw_disk": "mvm.templates.disk",
    "current_digest": "mvm.templates.builder",
    "debian_mirror": "mvm.templates.builder",
    "ensure_template": "mvm.templates.builder",
    "hold_template": "mvm.templates.builder",
    "list_templates": "mvm.templates.builder",
    "prune_templates": "mvm.templates.builder",
    "remove_template": "mvm.templates.builder",
}

__all__ = [
    "BUILD_FORMAT",
    "ProgressCallback",
    "Recipe",
    "TemplateFile",
    "TemplateHold",
    "TemplateImage",
    "available_templates",
    "build_from_dockerfile",
    "build_from_image",
    "build_raw_disk",
    "check_template",
    "current_digest",
    "debian_mirror",
    "ensure_template",
    "hold_template",
    "list_templates",
    "load_custom",
    "prune_templates",
    "recipe",
    "remove_template",
]

if TYPE_CHECKING:  # type checkers and IDEs see the lazy names as plain imports (a misspelt one is an error)
    from .builder import (
        TemplateHold,
        current_digest,
        debian_mirror,
        ensure_template,
        hold_template,
        list_templates,
        prune_templates,
        remove_template,
    )
    from .disk import build_raw_disk
    from .oci import build_from_dockerfile, build_from_image
    from .progress import ProgressCallback
else:
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
