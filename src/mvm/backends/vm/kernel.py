"""The guest kernel: Debian's ``linux-image-cloud-amd64``, extracted (never installed) and cached.

``ensure_kernel()`` resolves the versioned package the metapackage depends on,
``apt-get download``s it, unpacks it with ``dpkg-deb -x`` into a scratch
directory and keeps only what a microVM needs under
``cache_dir()/kernels/<version>/``:

* ``vmlinuz`` (the bzImage) and, when the payload could be unpacked and carries
  a PVH entry note, an uncompressed ``vmlinux`` that QEMU boots directly
  (saves the guest's own decompression, ~0.2 s under TCG);
* the virtio modules listed in ``MODULES`` (decompressed if the package ships
  ``.ko.xz``/``.ko.zst``), in dependency order (from each module's
  ``.modinfo depends=``);
* ``kernel.json`` — written last, so a directory without it is incomplete.

``MVM_KERNEL_DEB=/path/to/linux-image-*.deb`` skips apt (offline hosts).
A file lock makes concurrent first uses download it once.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import BackendUnavailable
from ...osutil import exit_description, file_lock, write_json_atomic
from ...paths import cache_dir

METAPACKAGE = "linux-image-cloud-amd64"
#: What the initramfs loads: the block disk, the agent's serial port and the RNG;
#: the network trio is kept for network policies that add a NIC.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio-rng",
    "failover",
    "net_failover",
    "virtio_net",
)
#: Loaded at every boot (the NIC modules only when a NIC is configured).
BOOT_MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console", "virtio-rng")
#: Loaded only when the VM has a NIC (network mode ``open``).
NET_MODULES = ("failover", "net_failover", "virtio_net")
_LAYOUT_VERSION = 1
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass(frozen=True)
class Kernel:
    """An extracted guest kernel in the cache."""

    version: str  # e.g. "6.1.0-57-cloud-amd64_6.1.192-3": ABI name and Debian version
    release: str  # uname -r inside the guest, e.g. "6.1.0-57-cloud-amd64"
    directory: Path
    modules: tuple[str, ...]  # names in load order (see ``module_path``)
    has_vmlinux: bool

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def boot_image(self) -> Path:
        """What QEMU's ``-kernel`` gets: the PVH ELF when there is one."""
        return self.vmlinux if self.has_vmlinux else self.vmlinuz

    def module_path(self, name: str) -> Path:
        return self.directory / "modules" / f"{name}.ko"


def kernels_dir() -> Path:
    path = cache_dir() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(argv: list[str], timeout: float = 300, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    except FileNotFoundError:
        raise BackendUnavailable(f"vm: {argv[0]} is not installed (needed to obtain the guest kernel)") from None
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"vm: {' '.join(argv)} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise BackendUnavailable(
            f"vm: {' '.join(argv)} failed (it {exit_description(proc.returncode)}): {proc.stderr.strip()[-500:]}"
        )
    return proc.stdout


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name]).strip()


def resolve_package() -> tuple[str, str]:
    """(versioned package name, Debian version) that ``linux-image-cloud-amd64`` depends on now."""

    def depends() -> str | None:
        try:
            out = _run(["apt-cache", "depends", METAPACKAGE], timeout=60)
        except BackendUnavailable:
            return None
        match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
        return match.group(1) if match else None

    package = depends()
    if package is None and os.geteuid() == 0:
        # A fresh host has empty package lists: refresh once, then ask again.
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, check=False)
        package = depends()
    if package is None:
        raise BackendUnavailable(
            f"vm: apt does not know {METAPACKAGE} (run `apt-get update`, or set MVM_KERNEL_DEB "
            "to a downloaded linux-image-*-cloud-amd64 .deb)"
        )
    out = _run(["apt-cache", "show", "--no-all-versions", package], timeout=60)
    match = re.search(r"^Version:\s*(\S+)", out, re.M)
    if not match:
        raise BackendUnavailable(f"vm: apt-cache shows no version for {package}")
    return package, match.group(1)


#: How long a resolved "newest cloud kernel" answer is trusted before apt is asked again
#: (asking costs ~0.5 s; a new kernel is picked up within this delay).
RESOLVE_TTL_SECONDS = 24 * 3600


def _resolve_package_cached() -> tuple[str, str]:
    path = kernels_dir() / "resolved.json"
    try:
        saved = json.loads(path.read_text())
        if time.time() - float(saved["checked_at"]) < RESOLVE_TTL_SECONDS:
            return str(saved["package"]), str(saved["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    package, version = resolve_package()
    write_json_atomic(path, {"package": package, "version": version, "checked_at": time.time()})
    return package, version


def _version_id(package: str, deb_version: str) -> str:
    release = package.removeprefix("linux-image-")
    return f"{release}_{deb_version}".replace("/", "_").replace("~", "-").replace(":", "-")


def _load_cached(directory: Path) -> Kernel | None:
    meta_path = directory / "kernel.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("layout") != _LAYOUT_VERSION:
        return None
    kernel = Kernel(
        version=meta["version"],
        release=meta["release"],
        directory=directory,
        modules=tuple(meta["modules"]),
        has_vmlinux=bool(meta["has_vmlinux"]),
    )
    if not kernel.vmlinuz.is_file() or not all(kernel.module_path(m).is_file() for m in kernel.modules):
        return None
    return kernel


def cached_kernels() -> list[Kernel]:
    """Every complete kernel in the cache, newest directory first."""
    found = []
    for entry in kernels_dir().iterdir():
        if entry.is_dir() and not entry.name.startswith("."):
            kernel = _load_cached(entry)
            if kernel is not None:
                found.append((entry.stat().st_mtime, kernel))
    return [k for _, k in sorted(found, key=lambda item: item[0], reverse=True)]


def ensure_kernel() -> Kernel:
    """Return the cached guest kernel, downloading and extracting it on first use."""
    deb_override = os.environ.get("MVM_KERNEL_DEB")
    if deb_override:
        deb = Path(deb_override)
        if not deb.is_file():
            raise BackendUnavailable(f"vm: MVM_KERNEL_DEB={deb_override} is not a file")
        version = _version_id(_deb_field(deb, "Package"), _deb_field(deb, "Version"))
        return _ensure_version(version, lambda scratch: deb)

    try:
        package, deb_version = _resolve_package_cached()
    except BackendUnavailable:
        # Offline but already extracted once: use what we have.
        cached = cached_kernels()
        if cached:
            return cached[0]
        raise
    version = _version_id(package, deb_version)

    def download(scratch: Path) -> Path:
        # _apt cannot write into a root-owned 0700 temp dir; let it, to avoid apt's warning.
        os.chmod(scratch, 0o755)
        _run(["apt-get", "download", f"{package}={deb_version}"], cwd=scratch, timeout=600)
        debs = sorted(scratch.glob("*.deb"))
        if not debs:
            raise BackendUnavailable(f"vm: apt-get download {package} produced no .deb")
        return debs[0]

    return _ensure_version(version, download)


def _ensure_version(version: str, fetch: Callable[[Path], Path]) -> Kernel:
    directory = kernels_dir() / version
    kernel = _load_cached(directory)
    if kernel is not None:
        return kernel
    with file_lock(kernels_dir() / ".lock"):
        kernel = _load_cached(directory)  # someone else finished while we waited
        if kernel is not None:
            return kernel
        with tempfile.TemporaryDirectory(dir=kernels_dir(), prefix=".extract-") as scratch_name:
            scratch = Path(scratch_name)
            deb = fetch(scratch)
            _extract(deb, version, scratch)
            if directory.exists():
                shutil.rmtree(directory)
            os.rename(scratch / "out", directory)
    kernel = _load_cached(directory)
    if kernel is None:
        raise BackendUnavailable(f"vm: extracted kernel {version} is incomplete")
    return kernel


def _extract(deb: Path, version: str, scratch: Path) -> None:
    tree = scratch / "tree"
    _run(["dpkg-deb", "-x", str(deb), str(tree)])
    vmlinuzes = sorted((tree / "boot").glob("vmlinuz-*"))
    module_roots = sorted(p for p in (tree / "lib" / "modules").glob("*") if p.is_dir()) if (
        tree / "lib" / "modules"
    ).is_dir() else sorted(p for p in (tree / "usr" / "lib" / "modules").glob("*") if p.is_dir())
    if not vmlinuzes or not module_roots:
        raise BackendUnavailable(f"vm: {deb.name} has no /boot/vmlinuz-* or /lib/modules/<release>")
    release = module_roots[0].name
    out = scratch / "out"
    (out / "modules").mkdir(parents=True)
    shutil.copyfile(vmlinuzes[0], out / "vmlinuz")

    found: dict[str, Path] = {}
    for path in module_roots[0].rglob("*.ko*"):
        name = path.name.split(".ko")[0]
        if name in MODULES:
            found[name] = path
    missing = [m for m in MODULES if m not in found]
    # The NIC modules are optional (only network policies need them); the boot set is not.
    if any(m in BOOT_MODULES for m in missing):
        raise BackendUnavailable(f"vm: kernel package {deb.name} lacks modules {missing}")
    deps: dict[str, list[str]] = {}
    for name, path in found.items():
        data = _decompress_module(path)
        (out / "modules" / f"{name}.ko").write_bytes(data)
        deps[name] = _module_depends(data)
    order = _dependency_order(deps)

    has_vmlinux = _extract_vmlinux(out / "vmlinuz", out / "vmlinux")
    meta = {
        "layout": _LAYOUT_VERSION,
        "version": version,
        "release": release,
        "modules": order,
        "has_vmlinux": has_vmlinux,
        "source": deb.name,
    }
    (out / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")


def _decompress_module(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    if path.name.endswith(".ko.gz"):
        import gzip

        return gzip.decompress(raw)
    return raw


def _module_depends(data: bytes) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo`` section."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if not match or not match.group(1):
        return []
    return [d.decode() for d in match.group(1).split(b",") if d]


def _dependency_order(deps: dict[str, list[str]]) -> list[str]:
    """Modules ordered so each comes after what it depends on (modinfo spells ``-`` as ``_``)."""

    def norm(name: str) -> str:
        return name.replace("-", "_")

    by_norm = {norm(n): n for n in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in deps[name]:
            if norm(dep) in by_norm:
                visit(by_norm[norm(dep)])
            # deps that are built in (not shipped as modules) need no loading
        order.append(name)

    for name in sorted(deps, key=lambda n: MODULES.index(n)):
        visit(name)
    return order


def _extract_vmlinux(bzimage: Path, dest: Path) -> bool:
    """Unpack the lz4 payload of a bzImage into an ELF (as scripts/extract-vmlinux does) and keep
    it only if it has a PVH entry note, which QEMU needs to boot an ELF kernel directly."""
    data = bzimage.read_bytes()
    if not shutil.which("lz4"):
        return False
    start = 0
    while True:
        pos = data.find(_LZ4_LEGACY_MAGIC, start)
        if pos < 0:
            return False
        start = pos + 1
        proc = subprocess.run(["lz4", "-dc"], input=data[pos:], capture_output=True, check=False)
        out = proc.stdout
        if out[:4] == b"\x7fELF" and _has_pvh_note(out):
            dest.write_bytes(out)
            return True


def _has_pvh_note(elf: bytes) -> bool:
    if elf[4] != 2 or elf[5] != 1:  # ELF64, little endian
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def kernel_obtainable() -> tuple[bool, str]:
    """Cheap check for ``availability()``: cached, offered by MVM_KERNEL_DEB, or known to apt."""
    if os.environ.get("MVM_KERNEL_DEB"):
        ok = Path(os.environ["MVM_KERNEL_DEB"]).is_file()
        return ok, "" if ok else f"MVM_KERNEL_DEB={os.environ['MVM_KERNEL_DEB']} is not a file"
    if cached_kernels():
        return True, ""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return False, "no cached guest kernel and no apt-get/dpkg-deb to download one (set MVM_KERNEL_DEB)"
    try:
        resolve_package()
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, ""
