"""``mvmctl doctor``: what this host can run, and why not."""

from __future__ import annotations

import shutil

import click

from ..backends import PREFERENCE, availability, choose_backend
from ..errors import MvmError
from ..paths import mvm_home
from .common import emit, json_option


def register(cli: click.Group) -> None:
    cli.add_command(doctor)


@click.command()
@json_option
def doctor(as_json: bool) -> None:
    """Report bubblewrap, cgroups, QEMU, KVM (usable or not), free disk, the default backend."""
    report: dict[str, object] = {"mvm_home": str(mvm_home())}
    for name in PREFERENCE:
        status = availability(name)
        report[name] = {"ok": status.ok, "reason": status.reason, **status.details}
    try:
        report["default_backend"] = choose_backend(None)
    except MvmError as exc:
        report["default_backend"] = None
        report["default_backend_error"] = str(exc)
    usage = shutil.disk_usage(mvm_home())
    report["free_disk_gb"] = round(usage.free / 1e9, 1)
    from ..templates.oci import tool_status

    report["oci_tools"] = tool_status()  # templates from OCI images / Dockerfiles

    def human() -> None:
        for name in PREFERENCE:
            entry = report[name]
            assert isinstance(entry, dict)
            if entry["ok"]:
                click.echo(f"[ok ] backend {name}: usable")
            else:
                click.echo(f"[no ] backend {name}: {entry['reason']}")
            for key, value in entry.items():
                if key != "ok" and not (key == "reason" and not entry["ok"]) and value:
                    click.echo(f"        {key}: {value}")
        click.echo(f"default backend: {report['default_backend'] or report.get('default_backend_error')}")
        click.echo(f"state directory: {report['mvm_home']} ({report['free_disk_gb']} GB free)")
        tools = report["oci_tools"]
        assert isinstance(tools, dict)
        missing = [name for name, ok in tools.items() if not ok]
        click.echo("OCI images/Dockerfiles: " + ("skopeo, umoci, buildah installed" if not missing
                                                 else f"missing {', '.join(missing)} (./setup.sh installs them)"))

    emit(as_json, report, human)
