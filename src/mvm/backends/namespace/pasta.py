"""Network mode ``open`` for namespace sandboxes: pasta (passt's namespace mode).

pasta attaches to the sandbox's own network namespace (it joins the sandbox's
user namespace, which owns that network namespace) and gives it a tap interface
``eth0`` whose traffic it re-creates as ordinary sockets on the host: outbound
connections look like the host's own. The addresses mirror QEMU's user
networking so both backends look alike from inside: guest ``10.0.2.15/24``,
gateway ``10.0.2.2`` (connections to it reach the host's loopback), DNS
``10.0.2.3`` (forwarded to the host's resolver). IPv4 only; no inbound port
forwarding (``-t none -u none``) and no namespace-to-host loopback bypass
(``-T none -U none``): port forwards go through the agent like in every mode.

pasta must join a user namespace owned by root, so it runs with ``--runas 0``;
after setting up it confines itself (its own namespaces, a seccomp filter).
It is a child of the supervisor's launcher thread with PR_SET_PDEATHSIG, killed
on stop/destroy, and its pid is recorded for orphan cleanup.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ...osutil import exit_description

GUEST_ADDRESS = "10.0.2.15"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
READY_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def pasta_path() -> str | None:
    return shutil.which("pasta")


def argv(binary: str, pid_file: Path, userns_fd: int, netns_fd: int) -> list[str]:
    return [
        binary, "--foreground", "--quiet", "--config-net", "--ipv4-only",
        "--tcp-ports", "none", "--udp-ports", "none", "--tcp-ns", "none", "--udp-ns", "none",
        "--address", GUEST_ADDRESS, "--netmask", "24", "--gateway", GATEWAY, "--ns-ifname", "eth0",
        "--dns-forward", DNS, "--runas", "0:0", "--pid", str(pid_file),
        "--userns", f"/proc/self/fd/{userns_fd}", "--netns", f"/proc/self/fd/{netns_fd}",
    ]


def attach(init_pid: int, work_dir: Path,
           launch: Callable[[Callable[[], subprocess.Popen[bytes]]], subprocess.Popen[bytes]],
           log_fd: int) -> subprocess.Popen[bytes]:
    """Start pasta on the namespaces of ``init_pid`` and wait until the interface is up.

    ``launch(fn)`` runs ``fn`` on the long-lived launcher thread (PR_SET_PDEATHSIG is per
    thread). Raises ``RuntimeError`` with pasta's words if it does not come up.
    """
    binary = pasta_path()
    if binary is None:
        raise RuntimeError("pasta is not installed (apt-get install passt)")
    pid_file = work_dir / "pasta.pid"
    pid_file.unlink(missing_ok=True)
    userns = os.open(f"/proc/{init_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(userns)
        raise
    try:
        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv(binary, pid_file, userns, netns), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                pass_fds=(userns, netns), preexec_fn=_die_with_parent, cwd="/",
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )

        proc = launch(spawn)
    finally:
        os.close(userns)
        os.close(netns)
    deadline = time.monotonic() + READY_TIMEOUT
    while not pid_file.exists():  # written once the namespace is configured
        if proc.poll() is not None:
            raise RuntimeError(f"pasta {exit_description(proc.returncode)}")
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"pasta did not configure the network within {READY_TIMEOUT:.0f} s")
        time.sleep(0.005)
    return proc


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
