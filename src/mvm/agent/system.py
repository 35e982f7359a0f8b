"""``agent.info`` and ``agent.configure``, and the small kernel calls around them.

Clock, entropy and hostname are best effort: in a namespace sandbox the agent
may not own the clock (``EPERM``); the result says what took effect.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import socket
import threading
import time
from typing import Any

from . import AGENT_VERSION
from .errors import Args, invalid

log = logging.getLogger("mvm.agent")

#: The environment every process starts from unless ``agent.configure`` changes it.
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
#: Written by ``mvm.templates.oci`` into templates made from OCI images: the image's
#: ``Env`` (over ``DEFAULT_ENV``), ``WorkingDir`` and ``User`` (the default ``cwd`` and
#: account of commands), and ``Entrypoint``/``Cmd`` (recorded, never started by the agent).
IMAGE_CONFIG_PATH = "/.mvm/image.json"
MAX_ENTROPY_BYTES = 4096
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_PR_SET_CHILD_SUBREAPER = 36


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> bool:
    """Make orphans of our descendants re-parent to the agent (``prctl(PR_SET_CHILD_SUBREAPER)``)."""
    try:
        if _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        log.warning("PR_SET_CHILD_SUBREAPER failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("PR_SET_CHILD_SUBREAPER unavailable: %s", exc)
    return False


def set_clock(epoch: float) -> bool:
    """Set CLOCK_REALTIME; False when not permitted (a namespace sandbox shares the host's clock)."""
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, int(epoch * 1_000_000_000))
        return True
    except OSError as exc:
        log.info("clock not set: %s", exc)
        return False


RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def mix_entropy(data: bytes) -> bool:
    """Add ``data`` to the kernel RNG's pool, credited, then force the CRNG to reseed.

    Writing to /dev/urandom only mixes bytes in: two clones restored from one VM
    snapshot would go on returning the same random stream until the kernel reseeds
    by itself. RNDADDENTROPY + RNDRESEEDCRNG make the divergence immediate (needs
    CAP_SYS_ADMIN, i.e. the VM guest; in a namespace sandbox the host kernel's
    RNG is shared and already unique, so the plain write is enough).
    """
    import fcntl
    import struct

    try:
        with open("/dev/urandom", "wb", buffering=0) as rng:
            try:
                fcntl.ioctl(rng, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
                fcntl.ioctl(rng, RNDRESEEDCRNG)
            except OSError:
                rng.write(data)
        return True
    except OSError as exc:
        log.info("entropy not mixed in: %s", exc)
        return False


def set_hostname(name: str) -> bool:
    try:
        socket.sethostname(name)
        return True
    except OSError as exc:
        log.info("hostname not set: %s", exc)
        return False


def mount_if_missing(source: str, target: str, fstype: str, options: str = "", flags: int = 0) -> None:
    """Mount a pseudo file system unless something is already mounted there (best effort)."""
    try:
        if os.path.ismount(target):
            return
        os.makedirs(target, exist_ok=True)
        libc = _libc()
        data = options.encode() if options else None
        if libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data) != 0:
            log.warning("mount %s on %s failed: %s", fstype, target, os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("mount %s on %s failed: %s", fstype, target, exc)


def prepare_as_init() -> None:
    """When the agent is PID 1: make sure the usual pseudo file systems are there."""
    ms_nosuid, ms_nodev, ms_noexec = 2, 4, 8
    mount_if_missing("proc", "/proc", "proc", flags=ms_nosuid | ms_nodev | ms_noexec)
    mount_if_missing("sysfs", "/sys", "sysfs", flags=ms_nosuid | ms_nodev | ms_noexec)
    mount_if_missing("devtmpfs", "/dev", "devtmpfs", "mode=0755", flags=ms_nosuid)
    mount_if_missing("devpts", "/dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620",
                     flags=ms_nosuid | ms_noexec)
    mount_if_missing("tmpfs", "/dev/shm", "tmpfs", "mode=1777", flags=ms_nosuid | ms_nodev)


#: The guest's cgroup the agent (and so every process it starts) runs in when the agent
#: enforces ``max_processes`` itself (a VM: nothing on the host can count a guest's processes).
CGROUP_ROOT = "/sys/fs/cgroup"
SANDBOX_CGROUP = "mvm-sandbox"


def limit_processes(limit: int) -> str:
    """Put the agent in a pids cgroup of ``limit`` tasks: everything it starts from then on
    (and their descendants) is counted with it, threads included, and ``fork`` fails with
    ``EAGAIN`` past the limit. Returns what took effect, for ``describe()``."""
    ms_nosuid, ms_nodev, ms_noexec = 2, 4, 8
    mount_if_missing("cgroup2", CGROUP_ROOT, "cgroup2", flags=ms_nosuid | ms_nodev | ms_noexec)
    group = os.path.join(CGROUP_ROOT, SANDBOX_CGROUP)
    try:
        with open(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "w") as handle:
            handle.write("+pids")
        os.makedirs(group, exist_ok=True)
        with open(os.path.join(group, "pids.max"), "w") as handle:
            handle.write(str(limit))
        with open(os.path.join(group, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))  # the whole thread group moves
    except OSError as exc:
        log.warning("max_processes not enforced: %s", exc)
        return f"not enforced: the guest's pids cgroup could not be set up ({exc})"
    return f"{limit} tasks: the guest's pids cgroup {group} (the agent's threads count)"


def load_image_config(path: str = IMAGE_CONFIG_PATH) -> dict[str, Any]:
    """The image config of an OCI template (empty for a Debian one, or if unreadable)."""
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class System:
    """Agent-wide settings: the base environment; ``agent.info``/``agent.configure``."""

    def __init__(self, image_config: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        image = load_image_config() if image_config is None else image_config
        env = image.get("env")
        self._default_env = {**DEFAULT_ENV, **({str(k): str(v) for k, v in env.items()}
                                               if isinstance(env, dict) else {})}
        cwd = image.get("working_dir")
        self.default_cwd = cwd if isinstance(cwd, str) and cwd.startswith("/") else "/"
        user = image.get("user")  # "name", "uid", "name:group" or "uid:gid"; the group follows the account
        name = user.split(":", 1)[0] if isinstance(user, str) else ""
        self.default_user = name if name not in ("", "root", "0") else None
        self._base_env = dict(self._default_env)
        self._started = time.monotonic()

    def base_env(self) -> dict[str, str]:
        with self._lock:
            return dict(self._base_env)

    def info(self) -> dict[str, Any]:
        return {
            "agent_version": AGENT_VERSION,
            "python": platform.python_version(),
            "kernel": os.uname().release,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
        }

    def configure(self, args: Args) -> dict[str, Any]:
        """Validate everything first, then apply: a bad field changes nothing."""
        env = args.env("env", allow_unset=True) if args.raw.get("env") is not None else None
        clock = args.number("clock_epoch")
        if clock is not None and clock <= 0:
            raise invalid("clock_epoch", f"must be seconds since the epoch, got {clock}")
        entropy_hex = args.string("entropy_hex", max_length=2 * MAX_ENTROPY_BYTES)
        entropy = None
        if entropy_hex is not None:
            try:
                entropy = bytes.fromhex(entropy_hex)
            except ValueError:
                raise invalid("entropy_hex", "must be an even number of hexadecimal digits") from None
        max_processes = args.integer("max_processes", minimum=1)
        hostname = args.string("hostname", max_length=253)
        if hostname is not None and (len(hostname.split(".")[0]) > 63 or not _HOSTNAME.match(hostname)):
            raise invalid("hostname", f"{hostname!r} is not a valid host name",
                          allowed="letters, digits, '-' and '.', labels of at most 63 characters")

        result: dict[str, Any] = {}
        if env is not None:
            merged = dict(self._default_env)
            for key, value in env.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            with self._lock:
                self._base_env = merged
            result["env_keys"] = sorted(merged)
        if clock is not None:
            result["clock_set"] = set_clock(clock)
        if entropy is not None:
            result["entropy_mixed"] = mix_entropy(entropy)
        if hostname is not None:
            result["hostname_set"] = set_hostname(hostname)
        if max_processes is not None:
            result["max_processes"] = limit_processes(max_processes)
        return result
