"""A built template as backends see it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: What a catalog build consists of (``builder``). Everything else in its directory -- the
#: raw and sized ext4 disks with their locks and temporaries -- is derived from ``rootfs``
#: on the node that needs it, so a template copied to another node (``mvm.cluster``) is these.
BUILD_FILES = ("rootfs", "manifest.json", "recipe.json", "build.log")


@dataclass(frozen=True)
class TemplateImage:
    """A built template under ``$MVM_HOME/templates/<name>-<digest>/``.

    ``rootfs`` is a complete root directory (Debian + the guest agent under
    ``/opt/mvm``), never written by a sandbox. ``agent_command`` is the argv that
    starts the agent inside the guest; the backend appends the channel arguments
    (``--fd N`` or ``--virtio-port agent``).
    """

    name: str
    digest: str  # content hash of the recipe + agent sources
    directory: Path
    suite: str
    python_version: str
    node_version: str | None = None  # only in templates with Node.js
    #: The agent's argv when it is not the Debian ``/usr/bin/python3`` (templates from
    #: OCI images run it on the runtime of ``mvm.templates.runtime``).
    agent_argv: tuple[str, ...] | None = None

    @property
    def manifest_path(self) -> Path:
        """``manifest.json``: what was built (packages and versions, size, build time, agent digest)."""
        return self.directory / "manifest.json"

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    @property
    def agent_command(self) -> list[str]:
        if self.agent_argv:
            return list(self.agent_argv)
        return ["/usr/bin/python3", "-I", "/opt/mvm/bin/mvm-agent"]

    @property
    def raw_disk(self) -> Path:
        """Where the VM backend keeps its read-only ext4 image of ``rootfs``.

        The file exists once ``ensure_raw_disk()`` (``mvm.templates.build_raw_disk``) made it.
        """
        return self.directory / "rootfs.ext4"

    def ensure_raw_disk(self) -> Path:
        """Build ``raw_disk`` if it is missing (cached, locked, atomic) and return its path."""
        from .disk import build_raw_disk

        return build_raw_disk(self)
