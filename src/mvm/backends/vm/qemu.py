"""QEMU ``microvm`` command lines, and the host facts they depend on.

One function builds every command line (cold boot, restore, accelerator probe)
so a restored VM gets exactly the devices, in exactly the order, of the VM that
was snapshotted — migration requires it.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ...agent.keeper import INIT_PORT

QEMU_BINARY = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

#: The emulated machine and its device list, recorded in snapshots (restore needs the same).
MACHINE = "microvm"
DEVICES = ("isa-serial", "virtio-rng-device", "virtio-serial-device/virtserialport:agent,virtserialport:mvm-init",
           "virtio-blk-device")
#: The NIC of network mode ``open`` (QEMU user networking: slirp), added after the others.
NET_DEVICE = "virtio-net-device/netdev:user"


def devices_for(net: str | None) -> tuple[str, ...]:
    """The device list of a VM with (``net="user"``) or without a NIC."""
    return (*DEVICES, NET_DEVICE) if net == "user" else DEVICES


def qemu_binary() -> str | None:
    return os.environ.get("MVM_QEMU") or shutil.which(QEMU_BINARY)


def qemu_img() -> str | None:
    return shutil.which(QEMU_IMG)


@functools.lru_cache(maxsize=4)
def _version_of(binary: str, mtime_ns: int) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    match = re.search(r"version\s+(\S+)(?:\s+\(([^)]*)\))?", out)
    if not match:
        return "unknown"
    return match.group(1) + (f" ({match.group(2)})" if match.group(2) else "")


def qemu_version() -> str:
    """e.g. ``7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)``; part of every cache key."""
    binary = qemu_binary()
    if binary is None:
        return "missing"
    return _version_of(binary, os.stat(binary).st_mtime_ns)


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, handed to the guest as ``tsc_early_khz``.

    Without it ~7% of TCG boots hang calibrating the TSC. Taken from
    ``/proc/cpuinfo`` ("cpu MHz") only when the TSC is constant (``constant_tsc``),
    where that figure is the TSC rate; ``MVM_TSC_KHZ`` overrides.
    """
    override = os.environ.get("MVM_TSC_KHZ")
    if override and override.isdigit():
        return int(override)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    if not flags or not mhz or "constant_tsc" not in flags.group(1).split():
        return None
    khz = round(float(mhz.group(1)) * 1000)
    return khz if khz > 0 else None


def vcpus_for(cpu_cores: float) -> int:
    """``-smp``: fractional cores round up (a 0.5-core sandbox still needs one vCPU)."""
    return max(1, math.ceil(cpu_cores))


def kernel_cmdline(accel: str, agent_argv: list[str] | None, probe: bool = False, net: str | None = None) -> str:
    args = ["console=ttyS0", "panic=-1", "quiet", "cryptomgr.notests", "mitigations=off"]
    tsc = host_tsc_khz()
    if tsc:
        args.append(f"tsc_early_khz={tsc}")
    if accel == "tcg":
        # QEMU 7.2's TCG caches translations by guest virtual address: without guest ASLR
        # an `echo` costs ~10 ms instead of ~35 ms. A guest-side trade-off, reported by describe().
        args.append("norandmaps")
    if net == "user":
        args.append("mvm.net=user")
    if probe:
        args.append("mvm.mode=probe")
    elif agent_argv:
        for arg in agent_argv:
            if not arg or any(c in arg for c in ", \t\n\"'"):
                raise ValueError(f"agent argv element {arg!r} cannot be passed on the kernel command line")
        args.append("mvm.agent=" + ",".join(agent_argv))
    return " ".join(args)


@dataclass(frozen=True)
class QemuConfig:
    """Everything that decides a VM's command line."""

    accel: str  # "tcg" or "kvm"
    vcpus: int
    memory_mb: int
    kernel: Path
    initrd: Path
    cmdline: str
    console_log: Path
    qmp_socket: Path
    agent_socket: Path | None = None  # None only for the probe
    init_socket: Path | None = None  # the guest keeper's port (agent restarts); with agent_socket
    disk: Path | None = None  # the qcow2 overlay; None only for the probe
    incoming: str | None = None  # "fd:N" (a plain image) or "exec:<unsealer>" to restore a snapshot
    net: str | None = None  # "user": a virtio NIC on QEMU user networking (network mode open)

    def argv(self) -> list[str]:
        binary = qemu_binary() or QEMU_BINARY
        argv = [binary, "-name", "mvm", "-M", MACHINE]
        if self.accel == "kvm":
            argv += ["-accel", "kvm", "-cpu", "host"]
        else:
            argv += ["-accel", "tcg,tb-size=32", "-cpu", "max"]
        argv += [
            "-smp", str(self.vcpus),
            "-m", f"{self.memory_mb}M",
            "-no-user-config", "-nodefaults", "-display", "none", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false",
            # QEMU confines itself too: no privilege gain, no obsolete syscalls. (spawn must stay
            # allowed: snapshots migrate through `exec:` helpers.)
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", self.cmdline,
            "-chardev", f"file,id=con,path={_opt(self.console_log)},append=on",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=qmp,path={_opt(self.qmp_socket)},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-object", "rng-random,filename=/dev/urandom,id=rng0",
            "-device", "virtio-rng-device,rng=rng0",
        ]
        if self.agent_socket is not None:
            argv += [
                "-device", "virtio-serial-device",
                "-chardev", f"socket,id=ag,path={_opt(self.agent_socket)},server=on,wait=off",
                "-device", "virtserialport,chardev=ag,name=agent",
            ]
            if self.init_socket is not None:
                argv += [
                    "-chardev", f"socket,id=init,path={_opt(self.init_socket)},server=on,wait=off",
                    "-device", f"virtserialport,chardev=init,name={INIT_PORT}",
                ]
        if self.disk is not None:
            argv += [
                "-drive", f"file={_opt(self.disk)},if=none,id=disk0,format=qcow2,discard=unmap,detect-zeroes=unmap",
                "-device", "virtio-blk-device,drive=disk0",
            ]
        if self.net == "user":
            # slirp: guest 10.0.2.15, host loopback reachable as 10.0.2.2, DNS 10.0.2.3; no IPv6,
            # no inbound forwards (ports go through the agent like in every other mode).
            argv += [
                "-netdev", "user,id=n0,ipv6=off",
                "-device", "virtio-net-device,netdev=n0",
            ]
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        return argv


def _opt(path: Path) -> str:
    """A path inside a QEMU ``key=value,...`` option: commas are escaped by doubling."""
    return str(path).replace(",", ",,")
