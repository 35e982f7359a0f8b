"""Running TypeScript and JavaScript workload scripts with Node (the TypeScript SDK).

``mvmctl compile|run ./script.ts`` (also ``.mts``, ``.js``, ``.mjs``) runs the script with
``node --enable-source-maps sdks/typescript/dist/runner/boot.js SCRIPT ARGS...``: the
repo's own build of ``@mvm/sdk`` (imports of ``@mvm/sdk`` resolve to it), ``.ts`` files
transpiled by the repo's ``typescript`` package; nothing is downloaded at run time. The
SDK is (re)built with that ``tsc`` when its sources are newer than the build.

In record/plan mode the TypeScript SDK appends the same recording events as
:class:`mvm.modes.recording.RecordTransport`, so both languages lower to the same IR.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import errors
from ..osutil import file_lock
from ..spec import create_defaults

#: Script suffixes run with Node instead of Python.
NODE_SUFFIXES = (".ts", ".mts", ".js", ".mjs")
SDK_DIR = Path(__file__).resolve().parents[3] / "sdks" / "typescript"
BOOT = SDK_DIR / "dist" / "runner" / "boot.js"
_STAMP = SDK_DIR / "dist" / ".build-stamp"


def is_node_script(path: Path | str) -> bool:
    return str(path).endswith(NODE_SUFFIXES)


def node_binary() -> str:
    """``$MVM_NODE``, else ``node`` on PATH."""
    found = os.environ.get("MVM_NODE") or shutil.which("node")
    if not found:
        raise errors.MvmError("running a TypeScript/JavaScript script needs Node.js (18.19 or later) on PATH "
                              "(./setup.sh installs Debian's nodejs), or $MVM_NODE")
    return found


def _newest_source() -> float:
    newest = 0.0
    for path in [SDK_DIR / "tsconfig.json", SDK_DIR / "package.json", *(SDK_DIR / "src").rglob("*.ts")]:
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest


def ensure_built() -> Path:
    """The SDK's compiled runner, building it with the repo's ``tsc`` when missing or stale."""
    try:
        fresh = _STAMP.stat().st_mtime >= _newest_source() and BOOT.is_file()
    except FileNotFoundError:
        fresh = False
    if fresh:
        return BOOT
    tsc = SDK_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.is_file():
        raise errors.MvmError(f"the TypeScript SDK is not installed: run `npm ci` in {SDK_DIR} (./setup.sh does it)")
    with file_lock(SDK_DIR / ".build.lock"):
        if _STAMP.is_file() and _STAMP.stat().st_mtime >= _newest_source() and BOOT.is_file():
            return BOOT
        done = subprocess.run([node_binary(), str(tsc), "-p", str(SDK_DIR / "tsconfig.json")], cwd=SDK_DIR,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise errors.MvmError(f"building the TypeScript SDK failed:\n{done.stdout}{done.stderr}")
        _STAMP.write_text("built by mvm.modes.node\n")
    return BOOT


def node_command(script: Path, args: Sequence[str]) -> list[str]:
    return [node_binary(), "--enable-source-maps", str(ensure_built()), str(script), *args]


def node_env(env: dict[str, str]) -> dict[str, str]:
    """What a Node script needs on top of the Python child's env: the ``mvmctl`` of this
    install (the SDK creates live sandboxes with ``mvmctl up``) and, for record/plan mode,
    the template names this host can build (so ``Sandbox.create`` fails like Python's)."""
    out = dict(env)
    mvmctl = Path(sys.executable).with_name("mvmctl")
    if "MVMCTL" not in out and mvmctl.is_file():
        out["MVMCTL"] = str(mvmctl)
    try:
        from ..templates import available_templates, catalog

        out["MVM_TEMPLATE_CATALOG"] = json.dumps({"available": available_templates(),
                                                  "unbuildable": dict(getattr(catalog, "UNBUILDABLE", {}))})
    except Exception:  # the SDK then asks `mvmctl template ls --available`
        out.pop("MVM_TEMPLATE_CATALOG", None)
    out["MVM_CREATE_DEFAULTS"] = json.dumps(create_defaults())  # else the SDK asks `mvmctl defaults --json`
    return out
