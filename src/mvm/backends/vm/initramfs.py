"""The guest's initramfs: static busybox, the virtio modules and a small ``/init``.

An uncompressed ``newc`` cpio written here in Python (no ``cpio`` binary needed),
cached per kernel version and ``/init`` content under ``cache_dir()/initramfs/``.

``/init`` reads its instructions from the kernel command line:

* ``mvm.mode=probe`` — print ``PROBE_MARKER`` on the console and reset
  (``-no-reboot`` turns that into a QEMU exit): the accelerator probe;
* otherwise bring up ``lo`` (and, with ``mvm.net=user`` -- network mode ``open`` --
  load the NIC modules and give ``eth0`` slirp's static 10.0.2.15/24 via 10.0.2.2),
  mount ``/dev/vda`` (ext4, the sandbox's overlay) on ``/newroot``, a
  tmpfs on ``/tmp``, move ``/dev``, ``/proc``, ``/sys`` over, and
  ``exec chroot /newroot <mvm.agent>`` where ``mvm.agent`` is the agent argv
  joined by commas (``chroot`` rather than ``switch_root``: measured 0.25 s faster).

Any failure prints ``mvm-init: <what>`` on the console and resets the VM, so
the host sees a clear message in ``console.log`` and an exited QEMU, not a hang.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

from ...errors import BackendUnavailable
from ...paths import cache_dir
from ...osutil import file_lock
from .kernel import BOOT_MODULES, NET_MODULES, Kernel

PROBE_MARKER = "MVM-PROBE-OK"
INIT_FAIL_PREFIX = "mvm-init:"
_APPLETS = ("sh", "mount", "insmod", "mkdir", "usleep", "sleep", "cat", "chroot", "reboot", "echo", "ls", "ip")

INIT_SCRIPT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "mvm-init: $*" > /dev/console
    reboot -f
    sleep 1000
}
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "mvm-init: insmod $m failed" > /dev/console
done
mode=agent
agent=
net=none
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        mvm.mode=*) mode="${arg#mvm.mode=}" ;;
        mvm.agent=*) agent="${arg#mvm.agent=}" ;;
        mvm.net=*) net="${arg#mvm.net=}" ;;
    esac
done
if [ "$mode" = probe ]; then
    echo "@MARKER@" > /dev/console
    reboot -f
    sleep 1000
fi
[ -n "$agent" ] || fail "no mvm.agent= on the kernel command line"
# Loopback only (port forwards and the egress proxy reach guest services through it) ...
ip link set lo up || fail "cannot bring up lo"
# ... unless the policy is mode=open: QEMU user networking, a static slirp address.
if [ "$net" = user ]; then
    for m in @NET_MODULES@; do
        insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
    done
    i=0
    while [ ! -e /sys/class/net/eth0 ]; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && fail "eth0 did not appear within 3 s"
        usleep 10000
    done
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
        || fail "cannot configure eth0"
fi
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 1000 ] && fail "/dev/vda did not appear within 10 s"
    usleep 10000
done
mount -t ext4 -o rw,noatime,commit=1 /dev/vda /newroot || fail "cannot mount /dev/vda (ext4)"
# Unsynced guest writes are lost when the host powers the VM off (stop): keep the window small.
echo 100 > /proc/sys/vm/dirty_expire_centisecs
echo 100 > /proc/sys/vm/dirty_writeback_centisecs
mkdir -p /newroot/tmp /newroot/dev /newroot/proc /newroot/sys
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp || fail "cannot mount tmpfs on /tmp"
mount --move /dev /newroot/dev || fail "cannot move /dev"
mount --move /proc /newroot/proc || fail "cannot move /proc"
mount --move /sys /newroot/sys || fail "cannot move /sys"
IFS=,
set -- $agent
unset IFS
[ -x "/newroot$1" ] || fail "the agent $1 is not an executable in the template's root"
exec chroot /newroot "$@"
fail "exec $* failed"
"""


def init_script(kernel: Kernel) -> str:
    modules = " ".join(m for m in kernel.modules if m in BOOT_MODULES)
    net_modules = " ".join(m for m in kernel.modules if m in NET_MODULES)
    return (INIT_SCRIPT.replace("@MODULES@", modules).replace("@NET_MODULES@", net_modules or "virtio_net")
            .replace("@MARKER@", PROBE_MARKER))


def busybox_path() -> Path | None:
    """A statically linked busybox (Debian's busybox-static installs /bin/busybox)."""
    for candidate in (os.environ.get("MVM_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file():
            path = Path(candidate)
            if _is_static(path):
                return path
    return None


def _is_static(path: Path) -> bool:
    """An ELF with no PT_INTERP needs no loader from the (absent) initramfs libc."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff = int.from_bytes(head[0x20:0x28], "little")
        phentsize = int.from_bytes(head[0x36:0x38], "little")
        phnum = int.from_bytes(head[0x38:0x3A], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") != 3 for i in range(phnum))


class CpioWriter:
    """Minimal ``newc`` (SVR4, no CRC) archive writer."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_bytes = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._out.write(header + name_bytes)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self._out.write(b"\0" * (-self._out.tell() % 512))
        return self._out.getvalue()


def build_initramfs(kernel: Kernel, busybox: Path) -> bytes:
    script = init_script(kernel)
    cpio = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", "tmp"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    for module in kernel.modules:
        cpio.file(f"lib/modules/{module}.ko", kernel.module_path(module).read_bytes())
    cpio.file("init", script.encode(), 0o755)
    return cpio.finish()


def ensure_initramfs(kernel: Kernel) -> Path:
    """The cached initramfs for ``kernel`` (rebuilt when ``/init``, busybox or modules change)."""
    busybox = busybox_path()
    if busybox is None:
        raise BackendUnavailable("vm: no static busybox (install Debian's busybox-static, or set MVM_BUSYBOX)")
    digest = hashlib.sha256()
    digest.update(init_script(kernel).encode())
    digest.update(kernel.version.encode())
    st = busybox.stat()
    digest.update(f"{busybox}:{st.st_size}:{st.st_mtime_ns}".encode())
    directory = cache_dir() / "initramfs"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{kernel.version}-{digest.hexdigest()[:16]}.cpio"
    if path.is_file():
        return path
    with file_lock(directory / ".lock"):
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(build_initramfs(kernel, busybox))
            os.replace(tmp, path)
    return path


def initramfs_digest(path: Path) -> str:
    """Part of the ready-snapshot key: the file name carries the content digest."""
    return path.stem


__all__ = [
    "INIT_FAIL_PREFIX",
    "PROBE_MARKER",
    "build_initramfs",
    "busybox_path",
    "ensure_initramfs",
]
