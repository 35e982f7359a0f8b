"""A create resolves its template once: ``launch`` writes the build it resolved into the
sandbox's config (``template_dir``) and the supervisor loads that build rather than
resolving the template again; a ``template_dir`` that is gone or outside the templates
folder is not trusted, the template is resolved as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mvm
from mvm.paths import sandboxes_dir, templates_dir
from mvm.spec import SandboxConfig
from mvm.supervisor.server import resolved_template
from mvm.templates import ensure_template

TEMPLATE = "python-3.13"


def _config(template_dir: str | None) -> SandboxConfig:
    return SandboxConfig(id="sb-0123456789", name="t", template=TEMPLATE, backend="namespace",
                         template_dir=template_dir)


def _resolved(config: SandboxConfig) -> Path:
    """The build the supervisor would boot from (held while it looks, then let go)."""
    with resolved_template(config) as hold:
        return hold.image.directory


def test_a_create_hands_its_resolved_template_to_the_supervisor() -> None:
    image = ensure_template(TEMPLATE)
    with mvm.Sandbox.create(TEMPLATE, backend="namespace", ttl="2m") as sb:
        config = json.loads((sandboxes_dir() / sb.id / "config.json").read_text())
        assert config["template_dir"] == str(image.directory)
        assert sb.commands.run(["true"]).exit_code == 0
    assert _resolved(_config(str(image.directory))) == image.directory


def test_a_template_dir_outside_the_templates_folder_or_gone_is_resolved_anew(tmp_path: Path) -> None:
    image = ensure_template(TEMPLATE)
    elsewhere = tmp_path / image.directory.name
    elsewhere.mkdir()
    shutil.copy(image.directory / "manifest.json", elsewhere / "manifest.json")
    (elsewhere / "rootfs").mkdir()  # looks like a build, but not one of ours
    assert _resolved(_config(str(elsewhere))) == image.directory
    gone = templates_dir() / (image.directory.name + "-gone")
    assert _resolved(_config(str(gone))) == image.directory
    assert _resolved(_config(None)) == image.directory
