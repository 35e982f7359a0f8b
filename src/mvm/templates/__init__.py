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

from .builder import (
    current_digest,
    debian_mirror,
    TemplateHold,
    ensure_template,
    hold_template,
    list_templates,
    prune_templates,
    remove_template,
)
from .catalog import available_templates, check_template, load_custom, recipe
from .disk import build_raw_disk
from .image import TemplateImage
from .oci import build_from_dockerfile, build_from_image
from .progress import ProgressCallback
from .recipe import BUILD_FORMAT, Recipe, TemplateFile

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
