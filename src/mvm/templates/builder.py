"""Build a template's root filesystem with mmdebstrap, and cache it by content hash.

``ensure_template`` is on the hot path of every sandbox create: for a template that
is already built it computes the recipe digest (a few small files hashed: the agent
sources), checks that ``<name>-<digest16>/manifest.json`` exists, and returns. The
rootfs tree is never walked or hashed there.

A build (root only: ``mmdebstrap --mode=root``):

1. ``mmdebstrap --variant=essential --include=<packages> SUITE DIR $MVM_DEBIAN_MIRROR``
   (default mirror ``http://deb.debian.org/debian``), with merged ``/usr`` set up by
   mmdebstrap's ``maybe-merged-usr`` hook (so bookworm does not pull in perl through
   ``usrmerge``), without man pages, translations and docs (copyright files are kept).
   A setup hook resolves the packages first (``apt-get --simulate``), so a misspelt
   name fails in seconds. pip packages are installed by a customize hook, inside the
   chroot, with network, trusting the host's CA bundle for that step only. The mirror
   is not part of the digest: any mirror serves the same packages.
2. Finishing, the same for every template: ``/etc/hostname`` = ``sandbox``;
   ``/etc/hosts`` with the localhost lines; an empty ``/etc/resolv.conf`` (a sandbox has
   no network unless its policy opens one, and the backend writes one then); ``/app``
   (empty, for user code); ``/tmp`` mode 1777; apt lists and caches removed; an empty
   ``/dev`` (both backends mount their own: ``bwrap --dev``, the VM's devtmpfs; and a
   tree without device nodes is safe to copy: no endless read of ``/dev/zero``); custom
   files copied in. ``/usr/lib/python3*/EXTERNALLY-MANAGED`` (PEP 668) is removed, so
   ``pip install`` works for the user in python templates: the template is a
   disposable sandbox, not a system whose Debian-managed packages need protecting.
3. The guest agent, ``mvm.agent.install.install_into(rootfs)``; checks that
   ``/usr/bin/python3`` runs.
4. ``manifest.json``, then an atomic rename of the temp dir into place.

Everything happens in ``.tmp-<key>+XXXX`` beside the final directory under an
exclusive ``flock`` per key, so concurrent ``ensure_template`` calls (threads or
processes) build once; a failed or interrupted build removes its temp dir (and the
next build removes any left by a crashed process).

**Agent-only changes**: the digest includes the agent's source digest, so editing the
agent makes a new template directory. When a build of the same recipe (same
``recipe_digest``) exists, it is copied (``cp -a --reflink=auto``: a real copy, never
hard links, since the old directory may be a running sandbox's lower layer) and only
the agent is re-installed: ~1 s instead of a 10-40 s mmdebstrap run. After a build,
superseded builds of the same name are removed except the newest one and any in use
(held by a process -- ``hold_template``: a sandbox's supervisor, a build copying from
it -- or mounted, or a file open inside); ``prune_templates`` removes the rest, also
under that rule, so checkouts sharing a cache never remove each other's builds mid-use.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..agent import install as agent_install
from ..errors import InvalidArgument, MvmError, TemplateBuildError
from ..osutil import exit_description, fsync_dir, write_json_atomic
from ..paths import templates_dir
from . import catalog, oci, store
from .image import TemplateImage
from .progress import BuildReporter, ProgressCallback, mmdebstrap_phase
from .recipe import BUILD_FORMAT, Recipe, TemplateFile, template_digest

DEFAULT_MIRROR = "http://deb.debian.org/debian"
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/maybe-merged-usr")
#: dpkg filters: no man pages, translations, info or docs (copyright files stay).
DPKG_FILTERS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\tsandbox
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
"""
#: Environment passed through to mmdebstrap (apt and the pip hook); nothing else from
#: the host leaks in (a host venv's PYTHONPATH, PIP_FIND_LINKS with host paths, ...).
_PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
             "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT")
#: mmdebstrap's TMPDIR, in the build's own directory: the temporaries it makes before it
#: moves TMPDIR into the new root (a gpg home to check the keyring) go with the build,
#: and a build killed mid-way leaves them only there, where the next build's
#: ``store.clean_stale`` removes them -- not in /tmp. (mmdebstrap unsets TMPDIR for its
#: hooks and chroot commands, so pip in the chroot never sees this host path.)
BUILD_TMPDIR = "mmdebstrap-tmp"
LOG_TAIL_LINES = 40
MIN_FREE_BYTES = 1024 * 2**20  # the largest built-in template needs ~400 MiB + its .debs


# ---- the public entry points ----------------------------------------------------


def ensure_template(name: str | Path | Recipe, *, progress: ProgressCallback | None = None) -> TemplateImage:
    """The built template ``name`` (a catalog name, a custom template's TOML path, or a
    ``Recipe``), building it first if needed.

    Safe to call from several threads or processes at once: one builds, the others wait
    and get the same directory. Raises ``TemplateNotFound`` for a name that cannot be
    built here (with the list of those that can) and ``TemplateBuildError`` when a build
    fails (nothing is left behind).

    >>> image = ensure_template("python-3.13")          # doctest: +SKIP
    >>> image.rootfs, image.python_version               # doctest: +SKIP
    (PosixPath('/root/.mvm/templates/python-3.13-3f9c…/rootfs'), '3.13.5')
    """
    if not isinstance(name, (Recipe, Path)) and (oci.is_image_name(name) or _image_template(name)):
        return oci.ensure_image_template(str(name), progress=progress)
    recipe = name if isinstance(name, Recipe) else catalog.recipe(name)
    digest = current_digest(recipe)
    directory = templates_dir() / store.template_key(recipe.name, digest)
    image = load_image(directory)
    if image is not None:
        return image
    return _build_locked(recipe, digest, directory, progress)


#: How often ``hold_template`` resolves a template that another process discarded between
#: its resolution and the hold (each time it is built again) before giving up.
_HOLD_ATTEMPTS = 3


class TemplateHold:
    """A built template held in use (``store.hold_use``) until :meth:`release`, the end
    of the ``with`` or of this process: no prune or removal, in any process, discards it."""

    def __init__(self, image: TemplateImage, fd: int):
        self.image = image
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TemplateHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_build(directory: Path) -> TemplateHold | None:
    """The complete build ``directory``, held; None if it is gone (pruned meanwhile)."""
    fd = store.hold_use(directory.name)
    image = load_image(directory)
    if image is None:
        os.close(fd)
        return None
    return TemplateHold(image, fd)


def hold_template(name: str | Path | Recipe, *, progress: ProgressCallback | None = None) -> TemplateHold:
    """:func:`ensure_template`, held: what a sandbox's supervisor boots from (and keeps for
    its life), what a build copies from. A build another process's prune discarded right
    after it was resolved is resolved (built) again."""
    for _ in range(_HOLD_ATTEMPTS):
        hold = hold_build(ensure_template(name, progress=progress).directory)
        if hold is not None:
            return hold
    raise TemplateBuildError(f"template {name}: removed by another process each time it was ready",
                             template=str(name))


def _image_template(name: str) -> bool:
    """A plain name that is no recipe but a template built here from an image or Dockerfile."""
    if name in catalog.BUILTIN or str(name).endswith(".toml"):
        return False
    return name not in catalog.custom_recipes() and name in oci.image_template_names()


def current_digest(recipe: Recipe) -> str:
    """The digest a build of ``recipe`` with today's agent sources has."""
    return template_digest(recipe, agent_install.source_digest())


def built_digest(name: str) -> str | None:
    """The digest ``ensure_template(name)`` returns now, without building anything: None
    when it would build first (no current build) or cannot (an unknown name). A warm
    pool's member answers it for a claimer that cannot compute it (``sandbox.template_digest``)."""
    try:
        if oci.is_image_name(name) or _image_template(name):
            image = oci.find_built(name)
            return None if image is None else image.digest
        recipe = catalog.recipe(name)
        digest = current_digest(recipe)
    except (MvmError, LookupError, OSError, ValueError):
        return None
    image = load_image(templates_dir() / store.template_key(recipe.name, digest))
    return None if image is None else image.digest


def load_image(directory: Path) -> TemplateImage | None:
    """The ``TemplateImage`` of a complete build directory, or None if there is none."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    if not (directory / "rootfs").is_dir():
        return None
    return TemplateImage(
        name=manifest["name"],
        digest=manifest["digest"],
        directory=directory,
        suite=manifest["suite"],
        python_version=manifest["python_version"],
        node_version=manifest.get("node_version"),
        agent_argv=tuple(manifest["agent_command"]) if manifest.get("agent_command") else None,
    )


def debian_mirror() -> str:
    mirror = os.environ.get("MVM_DEBIAN_MIRROR") or DEFAULT_MIRROR
    if not re.match(r"(https?|file)://[^\s]+$", mirror):
        raise InvalidArgument("MVM_DEBIAN_MIRROR", f"{mirror!r} is not a mirror URL",
                              allowed="http://, https:// or file:// URL of a Debian mirror")
    return mirror


# ---- building -------------------------------------------------------------------


def _build_locked(recipe: Recipe, digest: str, directory: Path, progress: ProgressCallback | None) -> TemplateImage:
    key = directory.name
    title = f"template {recipe.name}"
    with store.build_lock(key, on_wait=f"{title}: waiting for another process building it",
                          report=progress or _plain_note):
        image = load_image(directory)
        if image is not None:  # built by whoever held the lock before us
            return image
        store.clean_stale(own_key=key)
        if os.path.lexists(directory):  # incomplete (no manifest): only a manual edit gets here
            store.discard(directory)
        built = _build(recipe, digest, directory, progress)
    _prune_superseded(recipe.name, keep=built)
    image = load_image(built)
    if image is None:  # pragma: no cover - _build either renamed a complete dir or raised
        raise TemplateBuildError(f"template {recipe.name}: build finished but {built} is incomplete")
    return image


def _prune_superseded(name: str, keep: Path) -> None:
    """After a build of ``name``: remove its superseded builds except the newest one,
    unless something uses them (``store.in_use``). Bounds the disk an often-edited agent
    costs; snapshots name the template digest they need and refuse any other anyway."""
    others = [e for e in _builds_of(name) if e != keep]
    dated = []
    for entry in others:
        try:
            dated.append((json.loads((entry / "manifest.json").read_text()).get("built_at", ""), entry))
        except (OSError, ValueError):
            continue
    dated.sort(reverse=True)
    for _, entry in dated[1:]:
        try:
            store.discard_unless_used(entry)
        except (OSError, TemplateBuildError):
            continue  # pruning is housekeeping: never fail the build that triggered it


def _plain_note(text: str) -> None:
    print(f"mvm: {text}", file=sys.stderr, flush=True)


def _build(recipe: Recipe, digest: str, directory: Path, progress: ProgressCallback | None) -> Path:
    """Build into a temp dir beside ``directory`` and rename it into place; returns where
    the build went (another directory only if the agent sources changed meanwhile)."""
    if os.geteuid() != 0:
        raise TemplateBuildError(
            f"template {recipe.name}: building templates needs root (mmdebstrap --mode=root); "
            "run `sudo mvmctl template build` once, later sandboxes reuse the build",
            template=recipe.name,
        )
    if shutil.which("mmdebstrap", path="/usr/bin:/usr/local/bin:" + os.environ.get("PATH", "")) is None:
        raise TemplateBuildError("mmdebstrap is not installed (apt-get install mmdebstrap)", template=recipe.name)
    mirror = debian_mirror()
    reuse = _reusable_build(recipe)
    free = shutil.disk_usage(directory.parent).free
    if free < MIN_FREE_BYTES:
        raise TemplateBuildError(
            f"template {recipe.name}: only {free // 2**20} MiB free in {directory.parent}; "
            f"a build needs at least {MIN_FREE_BYTES // 2**20} MiB (set MVM_TEMPLATES to move the cache)",
            template=recipe.name,
        )
    count = len(recipe.packages)
    title = f"building template {recipe.name} ({recipe.suite}, {count} package{'s' if count != 1 else ''})"
    tmp = store.make_temp_dir(directory.name)
    rootfs = tmp / "rootfs"
    reuse_hold: TemplateHold | None = None
    try:
        reuse_hold = hold_build(reuse) if reuse is not None else None  # no prune while it is copied
        if reuse_hold is None:
            reuse = None  # none, or pruned after it was chosen
        with BuildReporter(title, progress) as reporter:
            if reuse is not None:
                reporter.phase(f"copying {reuse.name} (same recipe, only the mvm agent changed)")
                store.copy_tree(reuse / "rootfs", rootfs)
                if (reuse / "build.log").exists():
                    shutil.copy2(reuse / "build.log", tmp / "build.log")
            else:
                _run_mmdebstrap(recipe, rootfs, tmp, mirror, reporter)
                reporter.phase("finishing the root filesystem")
                finish_rootfs(recipe, rootfs)
            reporter.phase("installing the mvm agent")
            agent_digest = _install_agent(rootfs)
            final_digest = template_digest(recipe, agent_digest)
            if final_digest != digest:  # someone edited the agent during the build
                directory = directory.parent / store.template_key(recipe.name, final_digest)
            reporter.phase("checking the root filesystem")
            manifest = _manifest(recipe, final_digest, agent_digest, rootfs, mirror, reporter.elapsed(), reuse)
            (tmp / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=1) + "\n")
            write_json_atomic(tmp / "manifest.json", manifest, durable=True)
            try:
                os.rename(tmp, directory)
            except OSError:
                if load_image(directory) is None:
                    raise
                store.remove_tree(tmp)  # an identical build got there first
            fsync_dir(directory.parent)
            size_mib = manifest["size"] / 2**20
            reporter.done(f"built template {recipe.name} in {reporter.elapsed():.1f}s ({size_mib:.0f} MiB)")
            return directory
    except BaseException:
        store.remove_tree(tmp)
        raise
    finally:
        if reuse_hold is not None:
            reuse_hold.release()


def _install_agent(rootfs: Path) -> str:
    """``install_into``, repeated until the agent sources hold still; returns their digest."""
    for _ in range(5):
        before = agent_install.source_digest()
        agent_install.install_into(rootfs)
        if agent_install.source_digest() == before:
            return before
    raise TemplateBuildError("the mvm agent sources kept changing during the template build; try again")


def _reusable_build(recipe: Recipe) -> Path | None:
    """The newest complete build of the same recipe (any agent), if any."""
    best: tuple[str, Path] | None = None
    for entry in templates_dir().iterdir():
        if entry.name.startswith("."):
            continue
        try:
            manifest = json.loads((entry / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("recipe_digest") != recipe.recipe_digest or manifest.get("format") != BUILD_FORMAT:
            continue
        if not (entry / "rootfs" / "usr").is_dir():
            continue
        built_at = str(manifest.get("built_at", ""))
        if best is None or built_at > best[0]:
            best = (built_at, entry)
    return best[1] if best else None


def mmdebstrap_command(recipe: Recipe, rootfs: Path, mirror: str, customize_hook: Path | None,
                       check_hook: Path | None = None) -> list[str]:
    argv = [
        "mmdebstrap",
        "--variant=essential",
        "--mode=root",
        "--format=directory",
        "--verbose",
        "--include=" + ",".join(recipe.packages),
        "--aptopt=Acquire::Retries \"3\"",
    ]
    if MERGED_USR_HOOK.is_dir():
        argv.append(f"--hook-dir={MERGED_USR_HOOK}")
    if check_hook is not None:
        argv.append(f"--setup-hook={check_hook}")
    argv += [f"--dpkgopt={f}" for f in DPKG_FILTERS]
    if customize_hook is not None:
        argv.append(f"--customize-hook={customize_hook}")
    argv += [recipe.suite, str(rootfs), mirror]
    return argv


def _check_script(recipe: Recipe) -> str:
    """A setup hook: resolve the packages (apt-get --simulate) before anything is
    downloaded, so a misspelt name fails in ~2 s rather than after the essential set."""
    packages = " ".join(shlex.quote(p) for p in recipe.packages)
    return f"""#!/bin/sh
set -eu
root="$1"
APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"
export APT_CONFIG
ls "$root"/var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update --error-on=any -q
echo "I: checking the requested packages"
if ! out=$(apt-get --simulate --quiet=2 install {packages} 2>&1); then
    printf '%s\n' "$out"
    exit 1
fi
"""


def _customize_script(recipe: Recipe) -> str:
    """The mmdebstrap customize hook: pip packages, installed inside the chroot.

    pip trusts the host's CA bundle for the duration (a host behind a TLS-inspecting
    proxy trusts its CA; the guest's Debian bundle does not); the copy is removed after.
    """
    pip = " ".join(shlex.quote(p) for p in recipe.pip_packages)
    ca = _host_ca_bundle()
    return f"""#!/bin/sh
set -eu
root="$1"
ca={shlex.quote(ca or "")}
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
trap 'rm -f "$root/tmp/.mvm-build-ca.pem"' EXIT
if [ -n "$ca" ]; then
    cp "$ca" "$root/tmp/.mvm-build-ca.pem"
    PIP_CERT=/tmp/.mvm-build-ca.pem
    export PIP_CERT
fi
echo "I: installing pip packages: {pip}"
chroot "$root" /usr/bin/python3 -m pip install --no-cache-dir --no-input --disable-pip-version-check \\
    --root-user-action=ignore {pip}
"""


def _host_ca_bundle() -> str | None:
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      os.environ.get("REQUESTS_CA_BUNDLE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _build_env(workdir: Path) -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    env.update({k: os.environ[k] for k in _PASS_ENV if k in os.environ})
    scratch = workdir / BUILD_TMPDIR
    scratch.mkdir(mode=0o700, exist_ok=True)
    env["TMPDIR"] = str(scratch)
    return env


def _run_mmdebstrap(recipe: Recipe, rootfs: Path, workdir: Path, mirror: str, reporter: BuildReporter) -> None:
    check = workdir / "check.sh"
    check.write_text(_check_script(recipe))
    check.chmod(0o755)
    hook = None
    if recipe.pip_packages:
        hook = workdir / "customize.sh"
        hook.write_text(_customize_script(recipe))
        hook.chmod(0o755)
    argv = mmdebstrap_command(recipe, rootfs, mirror, hook, check)
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    errors: list[str] = []
    with open(workdir / "build.log", "wb") as log:
        log.write(("$ " + shlex.join(argv) + "\n").encode())
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=_build_env(workdir), start_new_session=True,
                                   preexec_fn=_terminate_with_parent)
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                log.write(raw)
                line = raw.decode("utf-8", "replace").rstrip("\n")
                tail.append(line)
                if line.startswith("E: ") and "mmdebstrap failed" not in line:
                    errors.append(line)
                phase = mmdebstrap_phase(line)
                if phase:
                    reporter.phase(phase)
            returncode = process.wait()
        except BaseException:
            _stop(process)
            raise
    store.remove_tree(workdir / BUILD_TMPDIR)  # (empty unless mmdebstrap died: not part of the template)
    if returncode != 0:
        first = _diagnosis(errors, tail) or f"mmdebstrap {exit_description(returncode)}"
        raise TemplateBuildError(
            f"template {recipe.name}: mmdebstrap failed: {first}\n--- last lines of its log ---\n" + "\n".join(tail),
            template=recipe.name,
            returncode=returncode,
            errors=errors,
            log_tail=list(tail),
        )


#: Log lines that say why a build failed better than apt's last "E:" line does.
_CAUSES = ("Unable to locate package", "No space left on device", "Temporary failure resolving",
           "Failed to fetch", "has no installation candidate", "Unmet dependencies", "ERROR: ")


def _diagnosis(errors: list[str], tail: deque[str]) -> str | None:
    for cause in _CAUSES:
        for line in [*errors, *tail]:
            if cause in line:
                return line.strip()
    return errors[0] if errors else None


def _terminate_with_parent() -> None:
    """In the child: SIGTERM when we die, so a killed build does not leave mmdebstrap
    writing into a temp dir that the next build removes (it unmounts on SIGTERM)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop mmdebstrap and its children (it unmounts what it mounted on SIGTERM)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


# ---- finishing the rootfs -------------------------------------------------------


def finish_rootfs(recipe: Recipe, rootfs: Path) -> None:
    """The finishing steps every template gets (module docstring, step 2)."""
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    for cache in (rootfs / "var/lib/apt/lists", rootfs / "var/cache/apt"):
        if cache.is_dir() and not cache.is_symlink():
            for path in cache.rglob("*"):
                if (path.is_file() or path.is_symlink()) and path.name != "lock":
                    path.unlink()
    finish_root(rootfs, recipe.files)


def finish_root(rootfs: Path, files: tuple[TemplateFile, ...] | list[TemplateFile]) -> None:
    """What every root needs, whatever made it (Debian or an OCI image): host name and
    hosts, an empty resolv.conf, an empty ``/dev``, ``/proc``, ``/sys``, ``/app``, ``/tmp`` 1777."""
    write_guest_file(rootfs, "/etc/hostname", b"sandbox\n")
    write_guest_file(rootfs, "/etc/hosts", HOSTS.encode())
    write_guest_file(rootfs, "/etc/resolv.conf", b"")
    dev = rootfs / "dev"
    if os.path.lexists(dev):
        store.remove_tree(dev)
    dev.mkdir(mode=0o755)
    for file in files:
        write_guest_file(rootfs, file.dest, file.content, file.mode)
    for mount_point, mode in (("/app", 0o755), ("/proc", 0o555), ("/sys", 0o555), ("/tmp", 0o1777)):
        directory = guest_path(rootfs, mount_point)
        if directory.is_symlink() or (os.path.lexists(directory) and not directory.is_dir()):
            directory.unlink()  # an image's link could point anywhere on the host: never follow it
        directory.mkdir(exist_ok=True)
        os.chmod(directory, mode, follow_symlinks=False)


def guest_path(rootfs: Path, path: str, *, create_parents: bool = True) -> Path:
    """Where guest ``path`` is on the host, resolving symlinks as the guest would (inside
    ``rootfs``: an absolute link like ``/etc/alternatives/x`` never escapes to the host).
    The last component is not followed."""
    root = rootfs.resolve()
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return root
    current = root
    todo = parts[:-1]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise TemplateBuildError(f"too many symlinks resolving {path} in {rootfs}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        if not candidate.exists():
            if not create_parents:
                return candidate
            candidate.mkdir(mode=0o755)
        elif not candidate.is_dir():
            raise TemplateBuildError(f"{path}: {candidate.relative_to(root)} is not a directory in the rootfs")
        current = candidate
    last = parts[-1]
    if last == "..":
        raise TemplateBuildError(f"{path} must name a file")
    return current / last


def write_guest_file(rootfs: Path, path: str, content: bytes, mode: int = 0o644) -> None:
    """Create or replace a regular file in the rootfs, never writing through a symlink."""
    target = guest_path(rootfs, path)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        raise TemplateBuildError(f"{path} exists in the rootfs and is not a regular file")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)


# ---- what was built -------------------------------------------------------------


def _manifest(recipe: Recipe, digest: str, agent_digest: str, rootfs: Path, mirror: str, seconds: float,
              reused_from: Path | None) -> dict[str, Any]:
    installed = dpkg_status(rootfs)
    python_version = _python_version(rootfs, installed)
    node = installed.get("nodejs")
    if not (rootfs / "opt/mvm/bin/mvm-agent").is_file():
        raise TemplateBuildError(f"template {recipe.name}: the mvm agent was not installed", template=recipe.name)
    size, inodes = store.tree_usage(rootfs)
    versions = {p.split("=")[0]: installed.get(p.split("=")[0]) for p in recipe.packages}
    reused_digest = None
    if reused_from is not None:
        reused_digest = json.loads((reused_from / "manifest.json").read_text()).get("digest")
    return {
        "name": recipe.name,
        "digest": digest,
        "recipe_digest": recipe.recipe_digest,
        "format": BUILD_FORMAT,
        "suite": recipe.suite,
        "packages": list(recipe.packages),
        "pip_packages": list(recipe.pip_packages),
        "files": [f.dest for f in recipe.files],
        "package_versions": versions,
        "installed_packages": len(installed),
        "python_version": python_version,
        "node_version": _upstream_version(node) if node else None,
        "size": size,
        "inodes": inodes,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 2),
        "agent_digest": agent_digest,
        "mirror": mirror,
        "reused_from": reused_digest,
        "builtin": recipe.builtin,
    }


def _python_version(rootfs: Path, installed: dict[str, str]) -> str:
    """The guest's Python version, asked of ``/usr/bin/python3`` itself (proves it runs)."""
    python3 = guest_path(rootfs, "/usr/bin/python3")
    if not os.path.lexists(python3):
        raise TemplateBuildError(f"{rootfs} has no /usr/bin/python3: the mvm agent needs it "
                                 "(add python3-minimal to packages)")
    code = "import platform; print(platform.python_version())"
    result = subprocess.run(
        [store.host_tool("chroot"), str(rootfs), "/usr/bin/python3", "-I", "-c", code],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, timeout=60, check=False,
    )
    version = result.stdout.strip()
    if result.returncode != 0 or not re.fullmatch(r"3\.\d+\.\d+\S*", version):
        raise TemplateBuildError(f"/usr/bin/python3 does not run in the rootfs: {result.stderr.strip()[-500:]}")
    return version


def dpkg_status(rootfs: Path) -> dict[str, str]:
    """Installed packages of a rootfs: name → version (from ``/var/lib/dpkg/status``)."""
    installed: dict[str, str] = {}
    try:
        text = (rootfs / "var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return installed
    for paragraph in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            installed[fields["Package"]] = fields.get("Version", "")
    return installed


def _upstream_version(debian_version: str) -> str:
    """``1:20.19.2+dfsg-1+deb13u3`` → ``20.19.2``."""
    version = debian_version.split(":", 1)[-1]
    return re.split(r"[-+~]", version, maxsplit=1)[0]


# ---- the cache as a user sees it --------------------------------------------------


def list_templates() -> list[dict[str, Any]]:
    """Built templates, by name then newest first: name, digest, size (bytes of the rootfs),
    built_at, path, suite, python_version, node_version, raw_disk (built or not) and
    current (built from today's recipe and agent; older builds are kept until pruned)."""
    out: list[dict[str, Any]] = []
    for entry in templates_dir().iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        image = load_image(entry)
        if image is None:
            continue
        manifest = json.loads(image.manifest_path.read_text())
        out.append({
            "name": image.name,
            "digest": image.digest,
            "size": manifest.get("size"),
            "built_at": manifest.get("built_at"),
            "path": str(entry),
            "suite": image.suite,
            "python_version": image.python_version,
            "node_version": image.node_version,
            "raw_disk": image.raw_disk.exists(),
            "current": _is_current(entry, image.digest, manifest),
            "source": oci.describe_source(manifest),
        })
    out.sort(key=lambda t: t["built_at"] or "", reverse=True)
    return sorted(out, key=lambda t: t["name"])


def _is_current(directory: Path, digest: str, manifest: dict[str, Any]) -> bool:
    if isinstance(manifest.get("source"), dict):  # from an OCI image: the newest build with today's agent
        builds = oci.image_builds(manifest["name"])
        return oci.is_current(manifest) and bool(builds) and builds[0][0] == directory
    try:
        recipe = Recipe.from_json(json.loads((directory / "recipe.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if recipe.builtin:
        builtin = catalog.BUILTIN.get(recipe.name)
        if builtin is None:
            return False
        recipe = builtin
    return current_digest(recipe) == digest


def remove_template(name: str, *, force: bool = False) -> int:
    """Remove every build of template ``name``; returns how many were removed.

    Raises ``InvalidState`` (removing nothing) when a build is in use by a sandbox
    (``store.in_use``: its rootfs is an overlay's lower layer, QEMU has its disk open),
    unless ``force`` is set.
    """
    if oci.image_builds(name):
        return oci.remove_image_template(name, force=force)
    return store.remove_builds(name, _builds_of(name), force=force)


def prune_templates(*, older_than_seconds: float = 0) -> int:
    """Remove builds that are not current (an older recipe or agent), were built more
    than ``older_than_seconds`` ago and are not in use; returns the count."""
    removed = 0
    cutoff = datetime.now(UTC).timestamp() - older_than_seconds
    for item in list_templates():
        built = datetime.fromisoformat(item["built_at"]).timestamp() if item["built_at"] else 0
        if not item["current"] and built <= cutoff:
            removed += store.discard_unless_used(Path(item["path"]))
    store.clean_stale()
    oci.collect_garbage()
    return removed


def _builds_of(name: str) -> list[Path]:
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}")
    return [e for e in templates_dir().iterdir() if pattern.fullmatch(e.name)]
