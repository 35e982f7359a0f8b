"""The agent's Python for images that have none (or one too old): a self-contained
CPython copied from a host-built template.

An OCI image may be busybox-only, musl-based (no glibc at all) or carry a Python
older than the agent needs (3.11). Rather than depend on what the image has, every
template made from an image gets the same runtime under ``/.mvm/runtime``::

    /.mvm/runtime/bin/python3            the interpreter of template RUNTIME_SOURCE
    /.mvm/runtime/lib/python3.X/         its standard library (tests, tkinter, idle... left out)
    /.mvm/runtime/lib/ld-linux-*.so.*    its own glibc loader
    /.mvm/runtime/lib/lib*.so*           every library the interpreter and the kept
                                         extension modules need (``ldd`` closure)

and the agent is started through that loader (``agent_command``), so nothing of the
image's own libc is used and nothing of the image is changed outside ``/.mvm`` and
``/opt/mvm``. The interpreter finds its standard library from its own path (the
``lib/python3.X/os.py`` landmark beside ``bin/``). Processes the agent starts are the
image's own programs with the image's environment: the runtime's libraries are passed
to the loader as ``--library-path``, never through ``LD_LIBRARY_PATH``.

The runtime is extracted once per recipe of ``RUNTIME_SOURCE`` into
``$MVM_TEMPLATES/.oci/runtime-<recipe16>/`` and copied into each image template
(about 35 MiB).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import TemplateBuildError
from ..paths import templates_dir
from . import catalog, store
from .progress import ProgressCallback

#: The built-in template whose interpreter becomes the runtime (Debian 13, Python 3.13).
RUNTIME_SOURCE = "python-3.13"
GUEST_DIR = "/.mvm/runtime"
#: Parts of the standard library the agent never imports (and that pull in big libraries).
_STDLIB_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "lib2to3",
                          "site-packages", "dist-packages", "config-3"})
_DYNLOAD_SKIP = re.compile(r"^_(curses|curses_panel|dbm|gdbm|sqlite3|tkinter)\.|^readline\.")


def loader_name(runtime: Path) -> str:
    found = sorted(p.name for p in (runtime / "lib").glob("ld-linux*.so*"))
    if not found:
        raise TemplateBuildError(f"the agent runtime {runtime} has no ld-linux loader")
    return found[0]


def agent_command(loader: str) -> list[str]:
    """The argv that starts the mvm agent with the runtime (the backend appends the channel)."""
    return [f"{GUEST_DIR}/lib/{loader}", "--library-path", f"{GUEST_DIR}/lib",
            f"{GUEST_DIR}/bin/python3", "-I", "/opt/mvm/bin/mvm-agent"]


def runtime_key() -> str:
    """What the runtime is made from (part of every image template's digest)."""
    return f"{RUNTIME_SOURCE}:{catalog.recipe(RUNTIME_SOURCE).recipe_digest[:16]}"


def ensure_runtime(progress: ProgressCallback | None = None) -> Path:
    """The extracted runtime directory (``bin/``, ``lib/``), made once."""
    from .builder import hold_template

    key = catalog.recipe(RUNTIME_SOURCE).recipe_digest[:16]
    target = templates_dir() / ".oci" / f"runtime-{key}"
    if (target / "bin" / "python3").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with hold_template(RUNTIME_SOURCE, progress=progress) as source_hold, store.build_lock(f"oci-runtime-{key}"):
        source = source_hold.image.rootfs
        if (target / "bin" / "python3").is_file():
            return target
        tmp = target.with_name(f".tmp-{target.name}")
        store.remove_tree(tmp)
        try:
            _extract(source, tmp)
            os.rename(tmp, target)
        except BaseException:
            store.remove_tree(tmp)
            raise
    return target


def _extract(source: Path, dest: Path) -> None:
    from .builder import guest_path

    python = guest_path(source, "/usr/bin/python3")
    real = os.path.realpath(python)
    if not real.startswith(str(source.resolve()) + "/"):  # an absolute link: resolve inside the rootfs
        real = str(guest_path(source, os.readlink(python)))
    version = Path(real).name  # python3.13
    stdlib = source / "usr" / "lib" / version
    if not (stdlib / "os.py").is_file():
        raise TemplateBuildError(f"{source}: no standard library at /usr/lib/{version}")
    (dest / "bin").mkdir(parents=True)
    (dest / "lib").mkdir()
    shutil.copy2(real, dest / "bin" / "python3")

    def skip(directory: str, names: list[str]) -> set[str]:
        if Path(directory).name == "lib-dynload":
            return {n for n in names if _DYNLOAD_SKIP.search(n)}
        return {n for n in names if n in _STDLIB_SKIP or n.startswith("config-3")}

    shutil.copytree(stdlib, dest / "lib" / version, symlinks=True, ignore=skip)
    guest_objects = [f"/usr/bin/{version}"] + [
        f"/usr/lib/{version}/lib-dynload/{p.name}" for p in (dest / "lib" / version / "lib-dynload").glob("*.so")]
    for guest_lib in _library_closure(source, guest_objects):
        shutil.copy2(guest_path(source, guest_lib).resolve(), dest / "lib" / Path(guest_lib).name)


def _library_closure(rootfs: Path, objects: list[str]) -> set[str]:
    """Guest paths of every shared library (and the loader) ``objects`` need, by ``ldd`` in the rootfs."""
    result = subprocess.run([store.host_tool("chroot"), str(rootfs), "/usr/bin/ldd", *objects],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                            timeout=120, check=False)
    if result.returncode != 0:
        raise TemplateBuildError(f"ldd in {rootfs} failed: {(result.stderr or result.stdout).strip()[-1000:]}")
    libs: set[str] = set()
    for line in result.stdout.splitlines():
        line = line.strip()
        match = re.match(r"\S+ => (/\S+) \(0x", line) or re.match(r"(/\S*ld-linux\S*) \(0x", line)
        if match:
            libs.add(match.group(1))
    if not any("ld-linux" in lib for lib in libs):
        raise TemplateBuildError(f"ldd in {rootfs} named no ELF loader for the agent runtime")
    return libs


def install_runtime(runtime: Path, rootfs: Path) -> list[str]:
    """Copy the runtime into ``rootfs`` at ``GUEST_DIR``; returns the agent argv."""
    from .builder import guest_path

    target = guest_path(rootfs, GUEST_DIR)
    if os.path.lexists(target):
        store.remove_tree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    store.copy_tree(runtime, target)
    return agent_command(loader_name(runtime))


def _sandboxed(rootfs: Path, argv: list[str], *, writable: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with ``rootfs`` as ``/``, read-only (``writable``: one guest dir that is
    not), in bubblewrap namespaces: an image is not trusted to run as root on the host
    (its ``/etc/ld.so.preload`` alone would be enough)."""
    from .builder import guest_path

    bwrap = [store.host_tool("bwrap"), "--unshare-all", "--unshare-user", "--die-with-parent",
             "--ro-bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if writable is not None:
        bwrap += ["--bind", str(guest_path(rootfs, writable)), writable]
    return subprocess.run([*bwrap, *argv], capture_output=True, text=True, timeout=timeout, check=False,
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, stdin=subprocess.DEVNULL)


def runtime_python_version(rootfs: Path, argv: list[str]) -> str:
    """Run the runtime inside ``rootfs`` (proves loader, libraries and stdlib are all there)."""
    interpreter = argv[:argv.index("-I") + 1]
    code = "import platform, json, socket, subprocess, ctypes, select; print(platform.python_version())"
    result = _sandboxed(rootfs, [*interpreter, "-c", code])
    version = result.stdout.strip()
    if result.returncode != 0 or not re.fullmatch(r"3\.\d+\.\d+\S*", version):
        raise TemplateBuildError(f"the agent runtime does not run in {rootfs}: {result.stderr.strip()[-500:]}")
    return version


def precompile_agent(rootfs: Path, argv: list[str]) -> None:
    """Byte-compile /opt/mvm with the runtime (the guest then never compiles at start)."""
    interpreter = argv[:argv.index("-I") + 1]
    _sandboxed(rootfs, [*interpreter, "-m", "compileall", "-q", "/opt/mvm"], writable="/opt/mvm")
