"""Test helpers for OCI templates: a real Debian ``docker-registry`` on 127.0.0.1 and
``buildah`` with private storage, both torn down after the session. Images are built
here (busybox-static, musl, a template rootfs, Dockerfiles): nothing leaves the host."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """``docker-registry serve`` with its own storage and (optionally) htpasswd auth."""

    def __init__(self, root: Path, htpasswd: Path | None = None):
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = root / "registry.log"
        auth = f"auth:\n  htpasswd:\n    realm: mvm-test\n    path: {htpasswd}\n" if htpasswd else ""
        (root / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            f"  delete:\n    enabled: true\nhttp:\n  addr: {self.address}\n{auth}")
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([shutil.which("docker-registry") or "/usr/bin/docker-registry", "serve",
                                             str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # 401 from an auth registry: it is up
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not start: "
                                       + self.log_path.read_text()[-2000:]) from None
                time.sleep(0.05)

    def blob_gets(self, digest: str) -> int:
        """How many times the registry served blob ``digest`` (from its access log)."""
        needle = f"/blobs/{digest}"
        return sum(1 for line in self.log_path.read_text().splitlines()
                   if "GET" in line and needle in line and "response" in line.lower())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Buildah:
    """buildah on a private vfs storage under ``root``."""

    def __init__(self, root: Path):
        self.base = ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"),
                     "--storage-driver", "vfs"]

    def __call__(self, *args: str) -> str:
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args)} failed: {result.stderr[-2000:]}")
        return result.stdout.strip()

    def image_from_dir(self, rootfs: Path, tag: str, *, base: str = "scratch", config: tuple[str, ...] = ()) -> str:
        container = self("from", "--tls-verify=false", base)
        try:
            self("copy", container, f"{rootfs}/.", "/")
            if config:
                self("config", *config, container)
            self("commit", "--quiet", container, tag)
        finally:
            self("rm", container)
        return tag

    def push(self, tag: str, ref: str, *creds: str) -> None:
        self("push", "--quiet", "--tls-verify=false", *creds, tag, f"docker://{ref}")


def busybox_root(directory: Path, *, musl: bool = False) -> Path:
    """A busybox-only root (``musl``: also the musl loader and an Alpine-like layout, no glibc)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    (directory / "bin").mkdir(parents=True)
    shutil.copy2(busybox, directory / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "env", "id", "pwd", "touch", "false", "true", "mkdir", "sleep"):
        os.symlink("busybox", directory / "bin" / applet)
    (directory / "etc").mkdir()
    (directory / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (directory / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")
    if musl:
        (directory / "lib").mkdir()
        shutil.copy2("/lib/ld-musl-x86_64.so.1", directory / "lib" / "ld-musl-x86_64.so.1")
        os.symlink("ld-musl-x86_64.so.1", directory / "lib" / "libc.musl-x86_64.so.1")
        (directory / "etc" / "os-release").write_text('ID=alpine-like\nNAME="musl + busybox"\n')
        (directory / "etc" / "apk").mkdir()
    return directory


def bcrypt_htpasswd(path: Path, user: str, password: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    path.write_text(f"{user}:{hashed}\n")
    return path


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
