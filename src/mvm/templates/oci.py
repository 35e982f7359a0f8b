"""Templates from OCI images and Dockerfiles: another *source* of the same template store.

``ensure_template("oci:127.0.0.1:5000/team/app:1.2")`` (or ``@sha256:…``) and
``build_from_dockerfile(path, context, name)`` end in an ordinary template directory
(``rootfs/`` + ``manifest.json``) that both backends use exactly like a Debian one
(the VM's raw ext4 base + qcow2 overlay, the namespace backend's overlay root).

Tools (Debian packages, installed by ``setup.sh``): ``skopeo`` copies images from the
registry, ``umoci`` unpacks them (whiteouts, ownership, the image's config), ``buildah``
builds Dockerfiles (``--isolation chroot``, in a private storage dir that is removed
afterwards). No registry protocol is spoken here.

Layers are content-addressed and shared: every image is copied into one OCI layout,
``$MVM_TEMPLATES/.oci/layout`` (``blobs/sha256/<digest>``), under a reference named
after the template build; skopeo skips blobs the layout already has, so a second image
sharing layers downloads and stores only the new ones. ``collect_garbage`` (run by
``prune_templates`` and ``remove_template``) drops references no template uses and
then the blobs nothing references (``umoci gc``).

Each build (``manifest.json``'s ``source``) records the reference, the manifest,
config and layer digests and the image config: ``Env``, ``WorkingDir`` and ``User``
are written to ``/.mvm/image.json``, which the agent reads at start (commands get that
environment and working directory by default); ``Entrypoint``/``Cmd`` are recorded
there too, not started. The agent runs on the runtime of ``mvm.templates.runtime``.

A tag is resolved when the template is built (``mvmctl template build --from-image``
resolves it again); ``ensure_template`` of an image already built never contacts the
registry. Registries on loopback (127.0.0.0/8, ``localhost``, ``::1``) are spoken to
over plain HTTP, like Docker does; others need HTTPS.

Credentials never touch the disk: the secret ``registry.<host>`` (``:`` becomes ``_``;
value ``user:password``; or a secret named explicitly) is resolved from the keystore
into memory and handed to skopeo/buildah as an auth file in a ``memfd``
(``--authfile /proc/self/fd/N``), closed as soon as the tool exits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..agent import install as agent_install
from ..errors import (
    DockerfileStepFailed,
    ImageError,
    ImageNotFound,
    ImagePlatformMismatch,
    InvalidArgument,
    RegistryAuthError,
    RegistryUnavailable,
    TemplateBuildError,
)
from ..osutil import fsync_dir, write_json_atomic
from ..paths import templates_dir
from . import catalog, runtime, store
from .image import TemplateImage
from .progress import BuildReporter, ProgressCallback

IMAGE_PREFIX = "oci:"
OCI_FORMAT = 1
IMAGE_CONFIG_GUEST_PATH = "/.mvm/image.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_REPO = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class ImageRef:
    """``REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]`` (no registry = docker.io, no tag = latest)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def template_name(self) -> str:
        return IMAGE_PREFIX + str(self)

    @property
    def loopback(self) -> bool:
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else self.registry
        return host in ("localhost", "[::1]") or host.startswith("127.")


def is_image_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(IMAGE_PREFIX)


def parse_ref(text: str) -> ImageRef:
    """Parse an image reference (with or without the ``oci:`` prefix); ``InvalidArgument`` names what is wrong."""
    allowed = "REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:<64 hex digits>"
    raw = text[len(IMAGE_PREFIX):] if text.startswith(IMAGE_PREFIX) else text
    if not raw or any(c.isspace() for c in raw):
        raise InvalidArgument("image", f"{text!r} is not an image reference", allowed=allowed)
    rest, at, digest_text = raw.partition("@")
    digest = digest_text if at else None
    if digest is not None and not _DIGEST.fullmatch(digest):
        raise InvalidArgument("image", f"{text!r}: bad digest {digest!r}", allowed=allowed)
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
    else:
        registry, path = "docker.io", rest if "/" in rest else f"library/{rest}"
    tag = None
    if ":" in path.rsplit("/", 1)[-1]:
        path, tag = path.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise InvalidArgument("image", f"{text!r}: bad tag {tag!r}", allowed=allowed)
    if not _REPO.fullmatch(path):
        raise InvalidArgument("image", f"{text!r}: bad repository name {path!r}", allowed=allowed)
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, path, tag, digest)


def validate_template_name(name: str) -> str:
    """A name for a template made from an image or Dockerfile (not a built-in one)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument("name", f"{name!r} is not a template name",
                              allowed="1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")
    if name in catalog.RESERVED:
        raise InvalidArgument("name", f"{name!r} is a built-in template name", allowed="any other name")
    return name


def host_platform() -> str:
    return "linux/" + _ARCH.get(platform.machine(), platform.machine())


def layout_dir() -> Path:
    return templates_dir() / ".oci" / "layout"


def directory_prefix(name: str) -> str:
    """The template directory prefix of ``name`` (``oci:`` names contain ``/`` and ``:``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) if is_image_name(name) else name


# ---- the hot path: a template already built ------------------------------------------


def image_builds(name: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Complete builds from images (of ``name``, or all), newest first."""
    found = []
    try:
        entries = list(templates_dir().iterdir())
    except FileNotFoundError:
        return []
    prefix = directory_prefix(name) + "-" if name is not None else None
    for entry in entries:
        if entry.name.startswith(".") or (prefix and not entry.name.startswith(prefix)):
            continue
        try:
            manifest = json.loads((entry / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        source = manifest.get("source")
        if not isinstance(source, dict) or source.get("kind") not in ("image", "dockerfile"):
            continue
        if name is not None and manifest.get("name") != name:
            continue
        if (entry / "rootfs").is_dir():
            found.append((entry, manifest))
    found.sort(key=lambda item: str(item[1].get("built_at", "")), reverse=True)
    return found


def image_template_names() -> list[str]:
    return sorted({manifest["name"] for _, manifest in image_builds()})


def is_current(manifest: dict[str, Any]) -> bool:
    return (manifest.get("agent_digest") == agent_install.source_digest()
            and manifest.get("runtime") == runtime.runtime_key() and manifest.get("oci_format") == OCI_FORMAT)


def find_built(name: str) -> TemplateImage | None:
    """The newest current build of ``name`` (no registry contact), or None."""
    from .builder import load_image

    for entry, manifest in image_builds(name):
        if is_current(manifest):
            return load_image(entry)
    return None


def ensure_image_template(name: str, *, progress: ProgressCallback | None = None) -> TemplateImage:
    """The template of image name ``oci:REF`` or of an image/Dockerfile template built
    here under a plain name: the current build if there is one; else, when an older
    build (another agent) exists, a rebuild from the layout (no registry contact); else
    ``oci:REF`` is pulled."""
    image = find_built(name)
    if image is not None:
        return image
    builds = image_builds(name)
    if builds:
        source = builds[0][1]["source"]
        return _build(name, source, layout_ref=source["layout_ref"], progress=progress)
    if not is_image_name(name):
        raise LookupError(name)
    return build_from_image(name, progress=progress)


# ---- building ------------------------------------------------------------------------


def build_from_image(ref: str, *, name: str | None = None, creds_secret: str | None = None,
                     progress: ProgressCallback | None = None) -> TemplateImage:
    """Pull ``ref`` (resolving its tag now) into the layout and make template ``name``
    (default ``oci:REF``) from it. Typed errors: ``ImageNotFound``, ``RegistryUnavailable``,
    ``RegistryAuthError``, ``ImagePlatformMismatch``; nothing is left behind on failure."""
    image_ref = parse_ref(ref)
    template_name = validate_template_name(name) if name is not None else image_ref.template_name
    _require_tools("skopeo", "umoci")
    with _claimed_ref(template_name) as layout_ref:
        try:
            with _layout_lock():
                _ensure_layout()
                argv = [store.host_tool("skopeo"), "copy", "--quiet", "--retry-times", "2",
                        "--override-os", "linux",
                        f"docker://{image_ref}", f"oci:{layout_dir()}:{layout_ref}"]
                if image_ref.loopback:
                    argv.insert(2, "--src-tls-verify=false")
                with _auth_file(image_ref.registry, creds_secret) as auth_args:
                    argv[2:2] = [a.replace("--authfile", "--src-authfile") for a in auth_args]
                    result = _run(argv, pass_fds=_fds(auth_args))
            if result.returncode != 0:
                raise _registry_error(str(image_ref), result.stderr or result.stdout)
        except BaseException:
            _drop_ref(layout_ref)  # takes the layout lock itself (flock: not re-entrant)
            collect_garbage()
            raise
        source = {"kind": "image", "ref": str(image_ref)}
        return _build(template_name, source, layout_ref=layout_ref, progress=progress)


def build_from_dockerfile(dockerfile: str | Path, *, name: str, context: str | Path | None = None,
                          creds_secret: str | None = None,
                          progress: ProgressCallback | None = None) -> TemplateImage:
    """Build a Dockerfile with buildah and make template ``name`` from the result.

    A failing instruction raises ``DockerfileStepFailed`` naming it; base images come
    from registries like ``build_from_image`` (credentials of the first FROM's registry
    by the same secret convention, or ``creds_secret``)."""
    template_name = validate_template_name(name)
    path = Path(dockerfile).resolve()
    if not path.is_file():
        raise InvalidArgument("dockerfile", f"{dockerfile} is not a file")
    context_dir = Path(context).resolve() if context is not None else path.parent
    if not context_dir.is_dir():
        raise InvalidArgument("context", f"{context} is not a directory")
    _require_tools("buildah", "umoci")
    bases = _from_images(path.read_text(errors="replace"))
    work = store.make_temp_dir(f"dockerfile-{template_name}")
    buildah = [store.host_tool("buildah"), "--root", str(work / "storage"), "--runroot", str(work / "run"),
               "--storage-driver", "vfs"]
    tag = f"localhost/mvm-build-{secrets.token_hex(6)}"
    with _claimed_ref(template_name) as layout_ref:
        try:
            argv = [*buildah, "bud", "--isolation", "chroot", "--layers=false", "--pull", "-f", str(path), "-t", tag]
            registry = bases[0].registry if bases else None
            # Loopback registries are plain HTTP (module docstring); any other base keeps TLS.
            argv.append(f"--tls-verify={'false' if bases and all(b.loopback for b in bases) else 'true'}")
            with _auth_file(registry, creds_secret) as auth_args:
                result = _run([*argv, *auth_args, str(context_dir)], pass_fds=_fds(auth_args), timeout=3600)
            if result.returncode != 0:
                raise _dockerfile_error(str(path), result.stdout, result.stderr, bases)
            try:
                with _layout_lock():
                    _ensure_layout()
                    pushed = _run([*buildah, "push", "--quiet", tag, f"oci:{layout_dir()}:{layout_ref}"])
                if pushed.returncode != 0:
                    raise ImageError(f"dockerfile {path}: exporting the built image failed: "
                                     f"{pushed.stderr.strip()[-1000:]}", image=str(path))
            except BaseException:
                _drop_ref(layout_ref)
                collect_garbage()
                raise
        finally:
            store.remove_tree(work)
        source = {"kind": "dockerfile", "dockerfile": str(path), "context": str(context_dir)}
        return _build(template_name, source, layout_ref=layout_ref, progress=progress)


def _build(name: str, source: dict[str, Any], *, layout_ref: str,
           progress: ProgressCallback | None) -> TemplateImage:
    """Unpack layout reference ``layout_ref`` into a template directory for ``name``."""
    from .builder import finish_root, guest_path, load_image, write_guest_file

    what = source.get("ref") or source.get("dockerfile")
    try:
        manifest_digest, oci_manifest, config = _read_image(layout_ref)
        _check_platform(str(what), config)
        runtime_dir = runtime.ensure_runtime(progress)
        agent_digest = agent_install.source_digest()
        digest = hashlib.sha256(json.dumps(
            [OCI_FORMAT, name, manifest_digest, agent_digest, runtime.runtime_key()]).encode()).hexdigest()
        directory = templates_dir() / store.template_key(directory_prefix(name), digest)
        image = load_image(directory)
        if image is not None:
            _drop_ref(layout_ref, unless_used=True)
            return image
        with store.build_lock(directory.name):
            image = load_image(directory)
            if image is not None:
                return image
            tmp = store.make_temp_dir(directory.name)
            try:
                with BuildReporter(f"making template {name} from {what}", progress) as reporter:
                    reporter.phase("unpacking the image layers")
                    bundle = tmp / "bundle"
                    with _layout_lock():
                        unpacked = _run([store.host_tool("umoci"), "unpack", "--image",
                                         f"{layout_dir()}:{layout_ref}", str(bundle)])
                    if unpacked.returncode != 0:
                        raise ImageError(f"image {what}: unpacking failed: {unpacked.stderr.strip()[-1000:]}",
                                         image=what)
                    rootfs = tmp / "rootfs"
                    os.rename(bundle / "rootfs", rootfs)
                    store.remove_tree(bundle)
                    reporter.phase("adding the mvm agent and its runtime")
                    finish_root(rootfs, ())
                    image_config = _image_config(config)
                    guest_path(rootfs, image_config["working_dir"]).mkdir(parents=True, exist_ok=True)
                    argv = runtime.install_runtime(runtime_dir, rootfs)
                    agent_install.install_into(rootfs, precompile=False)
                    runtime.precompile_agent(rootfs, argv)
                    _check_user(str(what), rootfs, image_config["user"])
                    write_guest_file(rootfs, IMAGE_CONFIG_GUEST_PATH,
                                     (json.dumps(image_config, indent=1) + "\n").encode())
                    python_version = runtime.runtime_python_version(rootfs, argv)
                    if agent_install.source_digest() != agent_digest:
                        raise TemplateBuildError(f"template {name}: the mvm agent changed during the build; "
                                                 "try again", template=name)
                    size, inodes = store.tree_usage(rootfs)
                    manifest = {
                        "name": name,
                        "digest": digest,
                        "oci_format": OCI_FORMAT,
                        "suite": "oci",
                        "python_version": python_version,
                        "node_version": None,
                        "agent_command": argv,
                        "agent_digest": agent_digest,
                        "runtime": runtime.runtime_key(),
                        "source": {
                            **source,
                            "layout_ref": layout_ref,
                            "manifest_digest": manifest_digest,
                            "config_digest": oci_manifest["config"]["digest"],
                            "layers": [layer["digest"] for layer in oci_manifest.get("layers", [])],
                            "platform": f"{config.get('os')}/{config.get('architecture')}",
                            "image_config": image_config,
                        },
                        "size": size,
                        "inodes": inodes,
                        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                        "build_seconds": round(reporter.elapsed(), 2),
                        "builtin": False,
                    }
                    write_json_atomic(tmp / "manifest.json", manifest, durable=True)
                    os.rename(tmp, directory)
                    fsync_dir(directory.parent)
                    reporter.done(f"made template {name} in {reporter.elapsed():.1f}s ({size / 2**20:.0f} MiB)")
            except BaseException:
                store.remove_tree(tmp)
                raise
    except BaseException:
        _drop_ref(layout_ref, unless_used=True)
        collect_garbage()
        raise
    built = load_image(directory)
    if built is None:  # pragma: no cover - the rename above made it complete
        raise TemplateBuildError(f"template {name}: build finished but {directory} is incomplete")
    return built


def _image_config(config: dict[str, Any]) -> dict[str, Any]:
    """What the guest honours: env and working directory of commands, the user; what it records."""
    body = config.get("config") or {}
    env: dict[str, str] = {}
    for item in body.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep and key:
            env[key] = value
    return {
        "env": env,
        "working_dir": body.get("WorkingDir") or "/",
        "user": body.get("User") or "",
        "entrypoint": list(body.get("Entrypoint") or []),
        "cmd": list(body.get("Cmd") or []),
        "exposed_ports": sorted(body.get("ExposedPorts") or {}),
    }


def _check_user(what: str, rootfs: Path, user: str) -> None:
    """The image's ``User`` must be an account of its ``/etc/passwd``: commands run as it by
    default (read as a file, never by running anything of the image)."""
    from .builder import guest_path

    name = user.split(":", 1)[0]
    if name in ("", "root", "0"):
        return
    try:
        passwd = guest_path(rootfs, "/etc/passwd", create_parents=False).read_text(errors="replace")
    except OSError:
        passwd = ""
    field = 2 if name.isdigit() else 0
    if not any(line.split(":")[field:field + 1] == [name] for line in passwd.splitlines()):
        raise ImageError(f"image {what}: its User {user!r} is not an account in its /etc/passwd "
                         "(commands run as that user by default)", image=what, user=user)


def _check_platform(what: str, config: dict[str, Any]) -> None:
    found = f"{config.get('os')}/{config.get('architecture')}"
    if found != host_platform():
        raise ImagePlatformMismatch(
            f"image {what} is for {found}; this host runs {host_platform()} (allowed: {host_platform()})",
            image=what, platform=found, allowed=[host_platform()])


# ---- the layout ------------------------------------------------------------------------


@contextmanager
def _layout_lock() -> Iterator[None]:
    templates_dir().mkdir(parents=True, exist_ok=True)
    with store.build_lock("oci-layout"):
        yield


def _ensure_layout() -> None:
    layout = layout_dir()
    if (layout / "index.json").is_file():
        return
    layout.parent.mkdir(parents=True, exist_ok=True)
    result = _run([store.host_tool("umoci"), "init", "--layout", str(layout)])
    if result.returncode != 0:
        raise TemplateBuildError(f"umoci init {layout} failed: {result.stderr.strip()}")


@contextmanager
def _claimed_ref(name: str) -> Iterator[str]:
    """A fresh layout reference for a build of ``name``, locked until the build ends, so
    ``collect_garbage`` never drops a reference whose template is still being made."""
    ref = f"{directory_prefix(name)[:100]}-{secrets.token_hex(6)}"
    try:
        with store.build_lock(_ref_lock(ref)):
            yield ref
    finally:
        (templates_dir() / ".locks" / f"{_ref_lock(ref)}.lock").unlink(missing_ok=True)


def _ref_lock(ref: str) -> str:
    return f"oci-ref-{ref}"


def _index() -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((layout_dir() / "index.json").read_text())
        return data
    except (OSError, ValueError):
        return {"manifests": []}


def _blob(digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    return (layout_dir() / "blobs" / algorithm / hexdigest).read_bytes()


def _read_image(layout_ref: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    for entry in _index().get("manifests") or []:
        if (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name") == layout_ref:
            manifest = json.loads(_blob(entry["digest"]))
            config = json.loads(_blob(manifest["config"]["digest"]))
            return str(entry["digest"]), manifest, config
    raise TemplateBuildError(f"{layout_ref} is not in the image layout {layout_dir()}")


def layout_refs() -> list[str]:
    return [str((e.get("annotations") or {}).get("org.opencontainers.image.ref.name"))
            for e in _index().get("manifests") or []]


def _drop_ref(layout_ref: str, *, unless_used: bool = False) -> None:
    if not (layout_dir() / "index.json").is_file() or layout_ref not in layout_refs():
        return
    if unless_used and any(m["source"].get("layout_ref") == layout_ref for _, m in image_builds()):
        return
    with _layout_lock():
        _run([store.host_tool("umoci"), "rm", "--image", f"{layout_dir()}:{layout_ref}"])


def collect_garbage() -> int:
    """Drop layout references no template build uses and every blob nothing references
    (partial downloads included); returns how many blob files went."""
    layout = layout_dir()
    if not (layout / "index.json").is_file():
        return 0
    with _layout_lock():
        # A ref whose build still runs is skipped; "used" is read after that check, so a
        # build that finished in between is seen with its template in place.
        idle = [ref for ref in layout_refs() if store.lock_is_free(_ref_lock(ref))]
        used = {m["source"].get("layout_ref") for _, m in image_builds()}
        umoci = store.host_tool("umoci")
        for ref in idle:
            if ref not in used:
                _run([umoci, "rm", "--image", f"{layout}:{ref}"])
        before = sum(1 for _ in (layout / "blobs").rglob("*"))
        _run([umoci, "gc", "--layout", str(layout)])
        return before - sum(1 for _ in (layout / "blobs").rglob("*"))


def layout_usage() -> dict[str, int]:
    """Bytes and count of the blobs in the shared layout."""
    blobs = [p for p in (layout_dir() / "blobs").rglob("*") if p.is_file()]
    return {"blobs": len(blobs), "bytes": sum(p.stat().st_size for p in blobs)}


# ---- tools, credentials, errors ----------------------------------------------------


TOOLS = ("skopeo", "umoci", "buildah")


def tool_status() -> dict[str, bool]:
    """Which of the OCI tools are installed (``mvmctl doctor``)."""
    status = {}
    for name in TOOLS:
        try:
            store.host_tool(name)
            status[name] = True
        except TemplateBuildError:
            status[name] = False
    return status


def _require_tools(*names: str) -> None:
    for name in names:
        try:
            store.host_tool(name)
        except TemplateBuildError:
            raise TemplateBuildError(f"{name} is not installed (apt-get install {name}; ./setup.sh installs it)",
                                     tool=name) from None


def _run(argv: list[str], *, pass_fds: tuple[int, ...] = (), timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
           "TMPDIR": os.environ.get("TMPDIR", "/var/tmp")}
    env.update({k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")})
    return subprocess.run(argv, capture_output=True, text=True, env=env, pass_fds=pass_fds, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def registry_secret_name(registry: str) -> str:
    """The keystore secret holding ``user:password`` for ``registry`` by default."""
    return "registry." + re.sub(r"[^A-Za-z0-9_.-]", "_", registry)


@contextmanager
def _auth_file(registry: str | None, creds_secret: str | None) -> Iterator[list[str]]:
    """``["--authfile", "/proc/self/fd/N"]`` for a memfd holding the registry's
    credentials (from the keystore), or ``[]`` when there are none; closed on exit."""
    from ..security.secrets import resolve_secret, secret_available

    if registry is None:
        yield []
        return
    name = creds_secret or registry_secret_name(registry)
    if creds_secret is None and not secret_available(name):
        yield []
        return
    value = resolve_secret(name)
    if ":" not in value:
        raise InvalidArgument("creds_secret", f"secret {name!r} must hold 'user:password'")
    auth = {"auths": {registry: {"auth": base64.b64encode(value.encode()).decode()}}}
    fd = os.memfd_create("mvm-registry-auth", os.MFD_CLOEXEC)
    try:
        os.write(fd, json.dumps(auth).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        yield ["--authfile", f"/proc/self/fd/{fd}"]
    finally:
        os.close(fd)


def _fds(auth_args: list[str]) -> tuple[int, ...]:
    return tuple(int(a.rsplit("/", 1)[1]) for a in auth_args if a.startswith("/proc/self/fd/"))


def _registry_error(what: str, output: str) -> ImageError:
    text = output.strip()
    detail = text.splitlines()[-1][-600:] if text else "no output"
    lowered = text.lower()
    if any(s in lowered for s in ("connection refused", "no such host", "i/o timeout", "network is unreachable",
                                  "connection reset", "server gave http response to https")):
        return RegistryUnavailable(f"image {what}: registry unreachable: {detail}", image=what)
    if any(s in lowered for s in ("unauthorized", "authentication required", "denied")):
        return RegistryAuthError(f"image {what}: the registry refused access (set the secret "
                                 f"{registry_secret_name(what.split('/', 1)[0])!r} to 'user:password' with "
                                 f"`mvmctl secret set`): {detail}", image=what)
    if "no image found in manifest list" in lowered or "choosing image instance" in lowered:
        return ImagePlatformMismatch(f"image {what} has no {host_platform()} variant: {detail}",
                                     image=what, allowed=[host_platform()])
    if any(s in lowered for s in ("manifest unknown", "name unknown", "not found", "repository name not known")):
        return ImageNotFound(f"image {what} not found in its registry (unknown repository, tag or digest): "
                             f"{detail}", image=what)
    return ImageError(f"image {what}: copying from the registry failed: {detail}", image=what)


def _from_images(dockerfile: str) -> list[ImageRef]:
    """The registry images a Dockerfile's FROM lines name (stages and ``scratch`` left out)."""
    stages: set[str] = set()
    found: list[ImageRef] = []
    for line in dockerfile.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].upper() == "FROM":
            args = [w for w in words[1:] if not w.startswith("--")]
            if not args:
                continue
            base = args[0]
            if len(args) >= 3 and args[1].upper() == "AS":
                stages.add(args[2])
            if base != "scratch" and base not in stages and "$" not in base:
                try:
                    found.append(parse_ref(base))
                except InvalidArgument:
                    continue
    return found


def _dockerfile_error(path: str, stdout: str, stderr: str, bases: list[ImageRef]) -> ImageError:
    text = f"{stdout}\n{stderr}"
    steps = re.findall(r"^STEP (\d+)/(\d+): (.*)$", stdout, flags=re.MULTILINE)
    failed = re.search(r'building at STEP "(.*?)": (.*)$', stderr, flags=re.MULTILINE)
    tail = [line for line in text.strip().splitlines() if line.strip()][-15:]
    if steps and steps[-1][2].upper().startswith("FROM") and (failed is None or failed.group(1).upper()
                                                              .startswith("FROM")):
        base = steps[-1][2].split()[1] if len(steps[-1][2].split()) > 1 else "?"
        error = _registry_error(base, stderr)
        error.details.update(dockerfile=path, step=steps[-1][2], index=int(steps[-1][0]))
        return error
    if failed is not None or steps:
        step = failed.group(1) if failed is not None else steps[-1][2]
        index = next((int(n) for n, _, s in reversed(steps) if s == step), int(steps[-1][0]) if steps else 0)
        reason = failed.group(2) if failed is not None else (tail[-1] if tail else "failed")
        return DockerfileStepFailed(f"dockerfile {path}: step {index} `{step}` failed: {reason}\n"
                                    + "\n".join(tail), image=path, dockerfile=path, step=step, index=index,
                                    log_tail=tail)
    return ImageError(f"dockerfile {path}: buildah failed: " + "\n".join(tail), image=path, log_tail=tail)


def remove_image_template(name: str, *, force: bool = False) -> int:
    """Remove every build of image template ``name`` (refusing builds in use unless
    ``force``), then the layout references and blobs only they used."""
    removed = store.remove_builds(name, [entry for entry, _ in image_builds(name)], force=force)
    collect_garbage()
    return removed


def describe_source(manifest: dict[str, Any]) -> str:
    """One line for ``template ls``: where a build came from."""
    source = manifest.get("source")
    if isinstance(source, dict):
        if source.get("kind") == "image":
            return f"image {source.get('ref')}"
        if source.get("kind") == "dockerfile":
            return f"dockerfile {source.get('dockerfile')}"
    return f"debian {manifest.get('suite', '?')}"


__all__ = ["IMAGE_PREFIX", "ImageRef", "build_from_dockerfile", "build_from_image", "collect_garbage",
           "describe_source", "ensure_image_template", "image_template_names", "is_image_name", "layout_dir",
           "layout_usage", "parse_ref", "remove_image_template"]
