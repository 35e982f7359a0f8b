"""Templates from OCI images and Dockerfiles, against a real local docker-registry.

One registry and one buildah storage for the module; images are built here from
busybox-static, from musl + busybox (an Alpine-like root without glibc or Python), and
from Dockerfiles whose FROM is an image pushed here. Sandboxes run on the namespace
backend, and one on the microVM.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import mvm
from mvm import errors
from mvm.backends import availability
from mvm.paths import templates_dir
import mvm.templates
from mvm.templates import list_templates, oci, remove_template

from oci_registry import Buildah, Registry, bcrypt_htpasswd, busybox_root, scratch_dir

pytestmark = pytest.mark.skipif(
    any(subprocess.run(["sh", "-c", f"command -v {t}"], capture_output=True).returncode for t in
        ("skopeo", "umoci", "buildah", "docker-registry")),
    reason="skopeo, umoci, buildah and docker-registry are installed by ./setup.sh")


class Images:
    def __init__(self, work: Path, registry: Registry, buildah: Buildah):
        self.work, self.registry, self.buildah = work, registry, buildah
        self.made: list[str] = []

    def ref(self, repo: str) -> str:
        return f"{self.registry.address}/{repo}"


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    with scratch_dir("mvm-oci-test-") as work:
        (work / "registry").mkdir()
        registry = Registry(work / "registry")
        buildah = Buildah(work / "buildah")
        imgs = Images(work, registry, buildah)
        try:
            bb = buildah.image_from_dir(busybox_root(work / "bb-root"), "bb", config=(
                "--env", "FOO=bar", "--workingdir", "/work", "--cmd", '["sh", "-c", "echo from cmd"]',
                "--entrypoint", '[]'))
            buildah.push(bb, imgs.ref("test/busybox:1"))
            musl = buildah.image_from_dir(busybox_root(work / "musl-root", musl=True), "musl",
                                          config=("--env", "PATH=/bin:/usr/bin", "--workingdir", "/home"))
            buildah.push(musl, imgs.ref("test/alpine-like:3"))
            yield imgs
        finally:
            registry.stop()  # first: a failing cleanup below must not leave it running
            for name in imgs.made:
                try:
                    remove_template(name, force=True)
                except errors.MvmError:
                    pass
            oci.collect_garbage()


def _clean_state() -> tuple[set[str], set[str]]:
    """Template directories (with temp ones) and layout blobs: what a failure must not change."""
    names = {p.name for p in templates_dir().iterdir() if p.name not in (".locks", ".oci")}
    blobs = {str(p) for p in (oci.layout_dir() / "blobs").rglob("*")} if oci.layout_dir().exists() else set()
    return names, blobs


def test_busybox_image_runs_with_its_env_and_workdir(images: Images, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "oci:" + images.ref("test/busybox:1")
    images.made.append(name)
    from mvm.templates import oci

    real_ensure, ensured = oci.ensure_image_template, []

    def counting_ensure(*args: object, **kwargs: object) -> object:
        ensured.append(args[0])
        return real_ensure(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(oci, "ensure_image_template", counting_ensure)
    with mvm.Sandbox.create(name, backend="namespace", ttl="10m") as sb:
        assert ensured == [name]  # the create resolves/builds the image once (validation only checks it)
        result = sb.commands.run(["sh", "-c", 'pwd; echo "$FOO"; test -e /usr/bin/python3 || echo no-python'])
        assert result.stdout.split() == ["/work", "bar", "no-python"]
        assert sb.commands.run(["sh", "-c", "echo hi > /work/f && cat /work/f"]).stdout == "hi\n"
    row = next(r for r in list_templates() if r["name"] == name)
    assert row["source"] == f"image {images.ref('test/busybox:1')}" and row["size"] > 0 and row["current"]
    manifest = json.loads((Path(row["path"]) / "manifest.json").read_text())
    assert manifest["source"]["image_config"]["cmd"] == ["sh", "-c", "echo from cmd"]  # recorded, not started


def test_alpine_like_musl_image_gets_a_working_agent(images: Images) -> None:
    name = "oci:" + images.ref("test/alpine-like:3")
    images.made.append(name)
    with mvm.Sandbox.create(name, backend="namespace", ttl="10m") as sb:
        r = sb.commands.run(["sh", "-c", "pwd; cat /etc/os-release | head -1; ls /lib; ls /lib64 2>&1 | head -1; "
                                         "/lib/ld-musl-x86_64.so.1 2>&1 | head -1; echo $PATH"])
        lines = r.stdout.splitlines()
        assert lines[0] == "/home" and lines[1] == "ID=alpine-like"
        assert "ld-musl-x86_64.so.1" in lines[2] and "No such file" in r.stdout  # no glibc dir at all
        assert "musl libc" in r.stdout and lines[-1] == "/bin:/usr/bin"
        info = sb.files.read("/.mvm/image.json")
        assert json.loads(info)["working_dir"] == "/home"


@pytest.mark.skipif(not availability("vm").ok, reason="the microVM backend is not available here")
def test_busybox_image_on_the_microvm(images: Images) -> None:
    name = "oci:" + images.ref("test/busybox:1")
    images.made.append(name)
    with mvm.Sandbox.create(name, backend="vm", ttl="10m") as sb:
        assert sb.commands.run(["sh", "-c", 'pwd; echo "$FOO"']).stdout.split() == ["/work", "bar"]


def test_dockerfile_with_run_env_workdir_copy(images: Images, monkeypatch: pytest.MonkeyPatch) -> None:
    context = images.work / "ctx"
    context.mkdir()
    (context / "greeting.txt").write_text("hello from the context\n")
    (context / "Dockerfile").write_text(
        f"FROM {images.ref('test/busybox:1')}\n"
        "ENV APP_MODE=prod\n"
        "WORKDIR /srv/app\n"
        "COPY greeting.txt ./\n"
        "RUN echo \"built in $APP_MODE\" > built.txt && mkdir -p /data\n"
        "USER nobody\n")
    images.made.append("df-app")
    cli = Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "mvmctl"
    cli = cli if cli.exists() else Path(__file__).resolve().parents[2] / ".venv" / "bin" / "mvmctl"
    out = subprocess.run([str(cli), "template", "build", "--dockerfile", str(context / "Dockerfile"),
                          "--context", str(context), "--name", "df-app", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["name"] == "df-app"
    monkeypatch.setenv("MVM_INCLUDE_BASE", str(context))
    with mvm.Sandbox.create("df-app", backend="namespace", ttl="10m", include=["greeting.txt"]) as sb:
        # include= copies are root's (as a COPY), also where the image's USER could not create /app
        assert sb.files.read("/app/greeting.txt") == b"hello from the context\n"
        assert _owner(sb, "/app/greeting.txt") == "0"
        r = sb.commands.run(["sh", "-c", 'pwd; echo "$APP_MODE $FOO"; cat greeting.txt built.txt'])
        assert r.stdout.splitlines() == ["/srv/app", "prod bar", "hello from the context", "built in prod"]
        assert sb.commands.run(["id", "-u"]).stdout == "65534\n"  # the image's USER by default
        assert sb.commands.run(["id", "-u"], user="root").stdout == "0\n"
        _files_act_as_the_images_user(sb, cli)
    ls = subprocess.run([str(cli), "template", "ls"], capture_output=True, text=True, check=True).stdout
    assert any(line.startswith("df-app ") and "dockerfile " in line for line in ls.splitlines())
    doctor = json.loads(subprocess.run([str(cli), "doctor", "--json"], capture_output=True, text=True).stdout)
    assert doctor["oci_tools"] == {"skopeo": True, "umoci": True, "buildah": True}


def _owner(sb: mvm.Sandbox, path: str) -> str:
    return sb.commands.run(["ls", "-ldn", path], check=True).stdout.split()[2]  # busybox has no stat


def _files_act_as_the_images_user(sb: mvm.Sandbox, cli: Path) -> None:
    """Files default to the account commands run as (the image's USER nobody), decided by
    the agent for every client: the SDK and ``mvmctl fs`` alike; ``user=`` still wins."""
    sb.commands.run(["sh", "-c", "echo root-only > /srv/app/secret; chmod 600 /srv/app/secret"], user="root")
    with pytest.raises(errors.PermissionDenied):
        sb.files.read("/srv/app/secret")
    with pytest.raises(errors.PermissionDenied):  # /srv/app is root's: nobody may create files there
        sb.files.write("/srv/app/new.txt", "x")
    with pytest.raises(errors.PermissionDenied):
        sb.files.remove("/srv/app/greeting.txt")
    assert sb.files.read("/srv/app/secret", user="root") == b"root-only\n"
    entry = sb.files.write("/tmp/mine.txt", "mine")
    assert _owner(sb, "/tmp/mine.txt") == "65534"  # nobody's file
    assert entry.size == 4 and sb.files.stat("/tmp/mine.txt").size == 4
    sb.files.mkdir("/tmp/nobodys")
    assert _owner(sb, "/tmp/nobodys") == "65534"
    sb.files.write("/srv/app/by-root.txt", "r", user="root")
    assert _owner(sb, "/srv/app/by-root.txt") == "0"
    name = sb.describe().name
    denied = subprocess.run([str(cli), "fs", "read", name, "/srv/app/secret"], capture_output=True, text=True,
                            timeout=60)
    assert denied.returncode != 0 and "Permission denied: /srv/app/secret" in denied.stderr
    as_root = subprocess.run([str(cli), "fs", "read", name, "/srv/app/secret", "--user", "root"],
                             capture_output=True, text=True, timeout=60)
    assert as_root.returncode == 0 and as_root.stdout == "root-only\n", as_root.stderr


def test_second_image_sharing_layers_downloads_only_the_new_one(images: Images) -> None:
    base_tag = images.ref("test/busybox:1")
    first = oci.build_from_image(base_tag)
    images.made.append(first.name)
    extra = images.work / "extra"
    (extra / "opt").mkdir(parents=True)
    (extra / "opt" / "tool.txt").write_text("a layer of its own\n")
    derived = images.buildah.image_from_dir(extra, "derived", base=base_tag)
    images.buildah.push(derived, images.ref("test/derived:1"))
    shared = json.loads(first.manifest_path.read_text())["source"]["layers"]
    before = oci.layout_usage()
    gets_before = {d: images.registry.blob_gets(d) for d in shared}
    second = oci.build_from_image(images.ref("test/derived:1"))
    images.made.append(second.name)
    layers = json.loads(second.manifest_path.read_text())["source"]["layers"]
    assert layers[:len(shared)] == shared and len(layers) == len(shared) + 1
    assert {d: images.registry.blob_gets(d) for d in shared} == gets_before  # not downloaded again
    assert images.registry.blob_gets(layers[-1]) == 1
    after = oci.layout_usage()
    assert after["blobs"] - before["blobs"] == 3  # the new layer, the config, the manifest
    # removing the first template keeps the layers the second one uses
    remove_template(first.name)
    assert oci.layout_usage()["blobs"] == after["blobs"] - 2  # only first's manifest and config went
    with mvm.Sandbox.create(second.name, backend="namespace", ttl="10m") as sb:
        assert sb.commands.run(["cat", "/opt/tool.txt"]).stdout == "a layer of its own\n"


@pytest.mark.parametrize("case", ["unknown image", "missing tag", "registry down", "bad reference"])
def test_bad_references_are_typed_errors_leaving_nothing(images: Images, case: str) -> None:
    ref = {"unknown image": images.ref("test/nothing-here:1"), "missing tag": images.ref("test/busybox:2"),
           "registry down": "127.0.0.1:9/test/busybox:1", "bad reference": images.ref("Test/UPPER:1")}[case]
    expected = {"unknown image": errors.ImageNotFound, "missing tag": errors.ImageNotFound,
                "registry down": errors.RegistryUnavailable, "bad reference": errors.InvalidArgument}[case]
    before = _clean_state()
    with pytest.raises(expected) as info:
        mvm.Sandbox.create("oci:" + ref, backend="namespace")
    assert ref.split("/", 1)[1].split(":")[0] in str(info.value)
    assert _clean_state() == before


def test_wrong_architecture_is_refused(images: Images) -> None:
    arm = images.buildah.image_from_dir(images.work / "bb-root", "arm", config=("--arch", "arm64"))
    images.buildah.push(arm, images.ref("test/arm-only:1"))
    before = _clean_state()
    with pytest.raises(errors.ImagePlatformMismatch) as info:
        oci.build_from_image(images.ref("test/arm-only:1"))
    assert "linux/arm64" in str(info.value) and info.value.details["allowed"] == [oci.host_platform()]
    assert _clean_state() == before


def test_failing_dockerfile_step_names_the_step(images: Images) -> None:
    context = images.work / "bad-ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {images.ref('test/busybox:1')}\nENV A=1\n"
                                        "RUN echo step-output && exit 7\nRUN echo never\n")
    before = _clean_state()
    with pytest.raises(errors.DockerfileStepFailed) as info:
        oci.build_from_dockerfile(context / "Dockerfile", name="df-bad")
    assert info.value.details["step"] == "RUN echo step-output && exit 7" and info.value.details["index"] == 3
    assert "df-bad" not in mvm.templates.available_templates()
    assert _clean_state() == before


def test_private_registry_credentials_by_keystore_reference(images: Images, mvm_home: Path) -> None:
    password = "s3cret-registry-pass-7f1e"
    with scratch_dir("mvm-oci-auth-") as root:
        registry = Registry(root, htpasswd=bcrypt_htpasswd(root / "htpasswd", "alice", password))
        try:
            ref = f"{registry.address}/private/busybox:1"
            images.buildah.push("bb", ref, "--creds", f"alice:{password}")
            before = _clean_state()
            with pytest.raises(errors.RegistryAuthError):
                oci.build_from_image(ref)
            assert _clean_state() == before
            secret = oci.registry_secret_name(registry.address)
            from mvm.security.secrets import Keystore

            Keystore().set(secret, f"alice:{password}")
            name = "oci:" + ref
            images.made.append(name)
            with mvm.Sandbox.create(name, backend="namespace", ttl="10m") as sb:
                assert sb.commands.run(["sh", "-c", "echo $FOO"]).stdout == "bar\n"
            for directory in (mvm_home, templates_dir(), Path("/run/containers"), Path("/root/.config/containers")):
                for path in directory.rglob("*") if directory.exists() else ():
                    try:  # other test sessions build and remove templates in the shared cache meanwhile
                        if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 * 2**20:
                            assert password.encode() not in path.read_bytes(), path
                    except FileNotFoundError:
                        continue
        finally:
            registry.stop()


def test_references_parse_and_record_mode_checks_them_without_pulling() -> None:
    digest = "sha256:" + "ab" * 32
    assert oci.parse_ref(f"oci:127.0.0.1:5000/team/app@{digest}") == oci.ImageRef(
        "127.0.0.1:5000", "team/app", None, digest)
    assert str(oci.parse_ref("localhost:5000/app")) == "localhost:5000/app:latest"
    assert oci.parse_ref("busybox:1.36").registry == "docker.io"
    for bad in ("oci:", "oci:127.0.0.1:5000/app@sha256:12", "oci:127.0.0.1:5000/App:1", "oci:a/b:bad tag"):
        with pytest.raises(errors.InvalidArgument):
            oci.parse_ref(bad)
    # record mode validates the reference and never contacts the (absent) registry
    assert mvm.templates.check_template("oci:127.0.0.1:9/team/app:1").repository == "team/app"
    with pytest.raises(errors.InvalidArgument):
        mvm.templates.check_template("oci:127.0.0.1:9/Team/app:1")
    with pytest.raises(errors.InvalidArgument):
        oci.validate_template_name("python-3.13")  # a built-in name


def test_image_from_a_template_rootfs_keeps_its_own_python(images: Images) -> None:
    """A Debian root (the python-3.13 template's) pushed as an image: its own Python is
    untouched, the agent runs on the injected runtime; created the way the TypeScript
    SDK does it (``mvmctl up --template oci:…``)."""
    from mvm.templates import ensure_template

    rootfs = ensure_template("python-3.13").rootfs
    tag = images.buildah.image_from_dir(rootfs, "debian-py", config=("--env", "LANG=C.UTF-8", "--workingdir", "/app"))
    ref = images.ref("test/debian-python:3.13")
    images.buildah.push(tag, ref)
    name = "oci:" + ref
    images.made.append(name)
    cli = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "mvmctl"
    up = subprocess.run([str(cli), "up", "--json", "--template", name, "--backend", "namespace", "--ttl", "10m"],
                        capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr
    box = json.loads(up.stdout)["name"]
    try:
        out = subprocess.run([str(cli), "exec", box, "--", "python3", "-c",
                              "import os, sys; print(os.getcwd(), sys.executable, sys.version_info[:2] >= (3, 13))"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["/app", "/usr/bin/python3", "True"]
        processes = subprocess.run([str(cli), "exec", box, "--", "sh", "-c",
                                    "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"],
                                   capture_output=True, text=True, timeout=120).stdout
        assert "/.mvm/runtime/bin/python3 -I /opt/mvm/bin/mvm-agent" in processes  # not the image's python
    finally:
        subprocess.run([str(cli), "down", box], capture_output=True, timeout=120)


def test_rm_and_prune_keep_what_is_in_use(images: Images) -> None:
    name = "oci:" + images.ref("test/alpine-like:3")
    images.made.append(name)
    with mvm.Sandbox.create(name, backend="namespace", ttl="10m") as sb:
        with pytest.raises(errors.InvalidState):
            remove_template(name)
        oci.collect_garbage()  # prune's part for images (prune_templates itself would also prune
        assert name in [r["name"] for r in list_templates()]  # other worktrees' builds in the shared cache)
        assert sb.commands.run(["cat", "/etc/os-release"]).exit_code == 0
        layers = json.loads(oci.find_built(name).manifest_path.read_text())["source"]["layers"]  # type: ignore[union-attr]
        assert all((oci.layout_dir() / "blobs" / "sha256" / d.split(":")[1]).is_file() for d in layers)
    assert remove_template(name) == 1
    assert all(not (oci.layout_dir() / "blobs" / "sha256" / d.split(":")[1]).exists() for d in layers)


def test_garbage_collection_spares_a_reference_whose_build_is_running(images: Images) -> None:
    first = oci.build_from_image(images.ref("test/busybox:1"))
    images.made.append(first.name)
    with oci._claimed_ref("in-flight") as ref:
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{images.ref('test/busybox:1')}",
                        f"oci:{oci.layout_dir()}:{ref}"], check=True, capture_output=True)
        oci.collect_garbage()
        assert ref in oci.layout_refs()
    oci.collect_garbage()
    assert ref not in oci.layout_refs()
