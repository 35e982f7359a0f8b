"""Which accelerator the VMs use: KVM only when it provably boots our guest, TCG otherwise.

Opening ``/dev/kvm`` proves little: on some hosts it is a PVM hypervisor on
which an ordinary guest hangs (or QEMU aborts on an MSR). So the probe boots
the real kernel + initramfs under KVM with ``mvm.mode=probe`` (``/init`` prints
a marker and resets) and waits ``PROBE_TIMEOUT`` seconds for the marker.

The verdict is cached per kernel version + QEMU version in
``cache_dir()/accel.json``. ``MVM_ACCEL=tcg|kvm`` overrides the choice; forcing
``kvm`` still needs a passing probe (otherwise a clear error, not a hung guest).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable, InvalidArgument
from ...paths import cache_dir
from .initramfs import PROBE_MARKER, ensure_initramfs
from ...osutil import exit_description, file_lock, write_json_atomic
from .kernel import Kernel, ensure_kernel
from .process import spawn, terminate
from .qemu import QemuConfig, kernel_cmdline, qemu_binary, qemu_version

PROBE_TIMEOUT = 8.0
_CACHE_FORMAT = 1
ACCELS = ("tcg", "kvm")


def _cache_path() -> Path:
    return cache_dir() / "accel.json"


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == _CACHE_FORMAT else {}


def kvm_device_status() -> tuple[bool, str]:
    """Whether ``/dev/kvm`` can be opened read-write (the first, cheap half of the test)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"kvm: unavailable (/dev/kvm: {exc.strerror or exc})"
    os.close(fd)
    return True, ""


def probe_boot(kernel: Kernel, initrd: Path, accel: str = "kvm", timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the probe guest under ``accel``; (booted, what was seen)."""
    with tempfile.TemporaryDirectory(prefix="mvm-probe-") as tmp:
        work = Path(tmp)
        console = work / "console.log"
        config = QemuConfig(
            accel=accel,
            vcpus=1,
            memory_mb=128,
            kernel=kernel.boot_image,
            initrd=initrd,
            cmdline=kernel_cmdline(accel, None, probe=True),
            console_log=console,
            qmp_socket=work / "qmp.sock",
        )
        started = time.monotonic()
        proc = spawn(config.argv(), work / "qemu.log")
        try:
            while time.monotonic() - started < timeout:
                if PROBE_MARKER.encode() in _read(console):
                    return True, f"probe guest booted in {time.monotonic() - started:.1f} s"
                if proc.poll() is not None:
                    if PROBE_MARKER.encode() in _read(console):
                        return True, f"probe guest booted in {time.monotonic() - started:.1f} s"
                    err = _read(work / "qemu.log").decode(errors="replace").strip().splitlines()
                    detail = err[0] if err else f"it {exit_description(proc.returncode)}"
                    return False, f"QEMU exited before the guest booted: {detail[:300]}"
                time.sleep(0.05)
            return False, f"no boot marker within {timeout:.0f} s"
        finally:
            terminate(proc, grace=0.5)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()[-65536:]
    except OSError:
        return b""


def probe_accelerator(refresh: bool = False, kernel: Kernel | None = None) -> dict[str, Any]:
    """The accelerator VMs will use: ``{accel, kvm_status, reason}`` (for ``mvmctl doctor``).

    ``kvm_status`` is one of ``"kvm: usable (...)"``, ``"kvm: unusable (guest did not boot)"``,
    ``"kvm: unavailable (...)"`` or ``"kvm: not probed (...)"``. Raises ``InvalidArgument`` for a
    bad ``MVM_ACCEL`` and ``BackendUnavailable`` when ``MVM_ACCEL=kvm`` but KVM cannot boot a guest.
    """
    forced = os.environ.get("MVM_ACCEL", "").strip().lower() or None
    if forced is not None and forced not in ACCELS:
        raise InvalidArgument("MVM_ACCEL", f"unknown accelerator {forced!r}", allowed=list(ACCELS))
    if forced == "tcg":
        return {"accel": "tcg", "kvm_status": "kvm: not probed (MVM_ACCEL=tcg)", "reason": "MVM_ACCEL=tcg"}

    device_ok, device_status = kvm_device_status()
    if not device_ok:
        if forced == "kvm":
            raise BackendUnavailable(f"vm: MVM_ACCEL=kvm but {device_status}")
        return {"accel": "tcg", "kvm_status": device_status, "reason": "no usable /dev/kvm: software emulation"}

    if qemu_binary() is None:
        raise BackendUnavailable("vm: qemu-system-x86_64 is not installed")
    kernel = kernel or ensure_kernel()
    key = f"{kernel.version}|qemu {qemu_version()}"
    verdict = None if refresh else _read_cache().get("verdicts", {}).get(key)
    if verdict is None:
        with file_lock(cache_dir() / "accel.lock"):
            cache = _read_cache()
            verdict = None if refresh else cache.get("verdicts", {}).get(key)
            if verdict is None:
                initrd = ensure_initramfs(kernel)
                booted, seen = probe_boot(kernel, initrd)
                verdict = {
                    "kvm_ok": booted,
                    "kvm_status": f"kvm: usable ({seen})" if booted else "kvm: unusable (guest did not boot)",
                    "detail": seen,
                    "probed_at": time.time(),
                }
                verdicts = cache.get("verdicts", {})
                verdicts[key] = verdict
                write_json_atomic(_cache_path(), {"format": _CACHE_FORMAT, "verdicts": verdicts})
    if verdict["kvm_ok"]:
        return {"accel": "kvm", "kvm_status": verdict["kvm_status"], "reason": "KVM probe booted a guest"}
    if forced == "kvm":
        raise BackendUnavailable(
            f"vm: MVM_ACCEL=kvm but {verdict['kvm_status']}: {verdict.get('detail', '')}; "
            "unset MVM_ACCEL (or set MVM_ACCEL=tcg) to use software emulation"
        )
    return {
        "accel": "tcg",
        "kvm_status": verdict["kvm_status"],
        "reason": f"KVM probe failed ({verdict.get('detail', '')}): software emulation (TCG)",
    }


__all__ = ["PROBE_TIMEOUT", "kvm_device_status", "probe_accelerator", "probe_boot"]
