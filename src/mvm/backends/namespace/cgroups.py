"""Per-sandbox cgroups, v1 (one hierarchy per controller) and v2 (unified).

Each sandbox gets a child cgroup ``mvm-<sandbox_id>`` under *this process's own*
cgroup (``/proc/self/cgroup``), never under the root: the supervisor may itself be
confined, and a child inherits that confinement. The limits:

========== ================================================ ==========================
resource   v1                                               v2
========== ================================================ ==========================
memory     memory.limit_in_bytes (+ memory.memsw.limit...)  memory.max, memory.swap.max=0
cpu        cpu.cfs_quota_us / cpu.cfs_period_us             cpu.max "quota period"
processes  pids.max (counts threads too)                    pids.max
pause      freezer.state FROZEN/THAWED                      cgroup.freeze 1/0
========== ================================================ ==========================

bwrap is placed in the cgroups between fork and exec (``procs_files()`` is what the
pre-exec hook writes its pid to), so every sandbox process is born inside.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable, SandboxError

CPU_PERIOD_US = 100_000
#: How long a pause may try to freeze a sandbox before it thaws it again and fails.
FREEZE_TIMEOUT = 5.0
#: A v1 freeze that has not completed after this many tries thaws for ``FREEZE_SETTLE`` s,
#: then tries anew: processes that keep forking can hold a v1 freezer in FREEZING, and
#: letting them run briefly gives it a fresh set to freeze (runc's v1 freezer does the same).
#: Not v2: its freezer takes new processes in itself, and a thaw would only undo the
#: progress of a freeze that waits for a task in uninterruptible sleep.
FREEZE_TRIES_BEFORE_SETTLING = 50
FREEZE_SETTLE = 0.01
V1_REQUIRED = ("memory", "cpu", "pids", "freezer")
V1_OPTIONAL = ("cpuacct",)
V2_REQUIRED = ("memory", "cpu", "pids")
#: v2 leaf this process moves into when its own cgroup must hand its controllers down
#: ("no internal processes": a cgroup that enables controllers for children holds none).
V2_SUPERVISOR_LEAF = "mvm-supervisors"


def detect_version(root: Path = Path("/sys/fs/cgroup")) -> str:
    """``"v2"`` on a unified host, ``"v1"`` otherwise (hybrid hosts count as v1 when the
    controllers we need are bound to v1 hierarchies)."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    return "v1"


def _write(path: Path, value: str | int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    return path.read_text()


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in _read(path).split()]
    except (FileNotFoundError, ProcessLookupError):
        return []
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return []
        raise


def _self_cgroups() -> dict[str, str]:
    """controller name (or "" for v2) -> this process's cgroup path."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if not controllers:
            out[""] = path
            continue
        for name in controllers.split(","):
            out[name] = path
    return out


def _v1_mounts() -> dict[str, tuple[str, str]]:
    """controller -> (mount root inside the hierarchy, mount point) for cgroup v1 mounts."""
    out: dict[str, tuple[str, str]] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(rfields) < 3 or rfields[0] != "cgroup":
            continue
        root, mountpoint = fields[3], fields[4].replace("\\040", " ")
        for option in rfields[2].split(","):
            out.setdefault(option, (root, mountpoint))
    return out


def _v2_mount() -> tuple[str, str] | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"]:
            return fields[3], fields[4]
    return None


def _join(root_in_hierarchy: str, mountpoint: str, path: str) -> Path:
    rel = path
    if root_in_hierarchy != "/" and path.startswith(root_in_hierarchy):
        rel = path[len(root_in_hierarchy) :]
    return Path(mountpoint) / rel.lstrip("/")


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _rmdir(path: Path, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SandboxCgroup:
    """Common verbs; subclasses know where the files are."""

    version = ""
    #: A freeze that is slow to complete thaws briefly now and then (``FREEZE_SETTLE``).
    settles_while_freezing = False

    def create(self, cpu_cores: float, memory_mb: int, max_processes: int) -> None:
        raise NotImplementedError

    def dirs(self) -> list[Path]:
        raise NotImplementedError

    def procs_files(self) -> list[str]:
        """Files the pre-exec hook writes the new pid to (one per hierarchy)."""
        return [str(d / "cgroup.procs") for d in self.dirs()]

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for d in self.dirs():
            seen.update(_read_pids(d / "cgroup.procs"))
        return sorted(seen)

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs())

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze every process inside, or fail with everything thawed again: a sandbox is
        never left half-frozen (its agent could be stopped while its state says running).
        Each try asks the kernel again: a v1 freezer freezes the tasks it finds when asked,
        so a process that keeps forking can hold it in FREEZING until asked anew."""
        deadline = time.monotonic() + timeout
        try:
            tries = 0
            while True:
                tries += 1
                if self.settles_while_freezing and tries % FREEZE_TRIES_BEFORE_SETTLING == 0:
                    self.thaw()
                    time.sleep(FREEZE_SETTLE)
                self._ask_frozen()
                if self.is_frozen():
                    return
                if time.monotonic() > deadline:
                    raise SandboxError(
                        f"freezing the sandbox (to pause or snapshot it): its processes did not all freeze "
                        f"within {timeout} s ({tries} tries; some kept starting new ones); it was thawed and runs on",
                        timeout_seconds=timeout)
                time.sleep(0.002)
        except BaseException:
            with contextlib.suppress(OSError):  # (the cgroup gone: nothing is left frozen)
                self.thaw()
            raise

    def _ask_frozen(self) -> None:
        """Ask the kernel to freeze every process inside (again)."""
        raise NotImplementedError

    def thaw(self) -> None:
        raise NotImplementedError

    def is_frozen(self) -> bool:
        """Every process inside is frozen (not merely being frozen)."""
        raise NotImplementedError

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process inside until none is left (thawing so the kills land)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            _kill_pids(pids)
            try:
                self.thaw()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {pids} survived SIGKILL in {self.dirs()}")
            time.sleep(0.005)

    def remove(self) -> None:
        """Kill what is inside and remove the directories (idempotent)."""
        if not self.exists():
            return
        self.kill_all()
        for d in self.dirs():
            _rmdir(d)

    def cpu_usage_ns(self) -> int:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        raise NotImplementedError

    def oom_kills(self) -> int:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        return {"version": self.version, "dirs": [str(d) for d in self.dirs()]}


class CgroupV1(SandboxCgroup):
    version = "v1"
    settles_while_freezing = True

    def __init__(self, controller_dirs: dict[str, Path]):
        self.controller_dirs = controller_dirs

    @classmethod
    def for_sandbox(cls, name: str) -> CgroupV1:
        mounts = _v1_mounts()
        own = _self_cgroups()
        missing = [c for c in V1_REQUIRED if c not in mounts or c not in own]
        if missing:
            raise BackendUnavailable(
                f"cgroup v1 controllers {missing} are not mounted; the namespace backend needs "
                f"{list(V1_REQUIRED)} to enforce limits"
            )
        dirs = {}
        for controller in (*V1_REQUIRED, *V1_OPTIONAL):
            if controller in mounts and controller in own:
                root, mountpoint = mounts[controller]
                dirs[controller] = _join(root, mountpoint, own[controller]) / name
        return cls(dirs)

    def dirs(self) -> list[Path]:
        unique: list[Path] = []
        for d in self.controller_dirs.values():
            if d not in unique:
                unique.append(d)
        return unique

    def create(self, cpu_cores: float, memory_mb: int, max_processes: int) -> None:
        for d in self.dirs():
            d.mkdir(exist_ok=True)
        mem = self.controller_dirs["memory"]
        limit = memory_mb * 1024 * 1024
        _write(mem / "memory.limit_in_bytes", limit)
        if (mem / "memory.memsw.limit_in_bytes").exists():
            _write(mem / "memory.memsw.limit_in_bytes", limit)  # no swap beyond the limit
        try:
            _write(mem / "memory.swappiness", 0)
        except OSError:
            pass
        cpu = self.controller_dirs["cpu"]
        _write(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
        _write(cpu / "cpu.cfs_quota_us", max(1000, int(cpu_cores * CPU_PERIOD_US)))
        _write(self.controller_dirs["pids"] / "pids.max", max_processes)

    def _ask_frozen(self) -> None:
        _write(self.controller_dirs["freezer"] / "freezer.state", "FROZEN")

    def thaw(self) -> None:
        state = self.controller_dirs["freezer"] / "freezer.state"
        if state.exists():
            _write(state, "THAWED")

    def is_frozen(self) -> bool:
        state = self.controller_dirs["freezer"] / "freezer.state"
        return state.exists() and _read(state).strip() == "FROZEN"  # (not FREEZING: part-way)

    def cpu_usage_ns(self) -> int:
        d = self.controller_dirs.get("cpuacct")
        if d is not None and (d / "cpuacct.usage").exists():
            return int(_read(d / "cpuacct.usage"))
        # without cpuacct: cpu.stat has no usage on v1; report throttling-free zero
        return 0

    def memory_bytes(self) -> int:
        return int(_read(self.controller_dirs["memory"] / "memory.usage_in_bytes"))

    def record(self) -> dict[str, Any]:
        return {**super().record(), "controllers": {k: str(v) for k, v in self.controller_dirs.items()}}

    def oom_kills(self) -> int:
        for line in _read(self.controller_dirs["memory"] / "memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


class CgroupV2(SandboxCgroup):
    version = "v2"

    def __init__(self, path: Path, parent: Path | None = None):
        self.path = path
        self.parent = parent if parent is not None else path.parent

    @classmethod
    def for_sandbox(cls, name: str, own_dir: Path | None = None) -> CgroupV2:
        if own_dir is None:
            mount = _v2_mount()
            if mount is None:
                raise BackendUnavailable("no cgroup2 file system is mounted")
            own = _self_cgroups().get("", "/")
            own_dir = _join(mount[0], mount[1], own)
            if own_dir.name == V2_SUPERVISOR_LEAF:  # we moved ourselves there earlier
                own_dir = own_dir.parent
        return cls(own_dir / name, own_dir)

    def dirs(self) -> list[Path]:
        return [self.path]

    def _delegate(self) -> None:
        """Make memory/cpu/pids available to children of our own cgroup."""
        available = _read(self.parent / "cgroup.controllers").split()
        missing = [c for c in V2_REQUIRED if c not in available]
        if missing:
            raise BackendUnavailable(
                f"cgroup v2 controllers {missing} are not delegated to {self.parent}; run mvm in a "
                "cgroup with them (e.g. systemd-run --user --scope -p Delegate=yes ...)"
            )
        enabled = _read(self.parent / "cgroup.subtree_control").split()
        wanted = " ".join(f"+{c}" for c in V2_REQUIRED if c not in enabled)
        if not wanted:
            return
        try:
            _write(self.parent / "cgroup.subtree_control", wanted)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        # "no internal processes": move this process into a leaf, then enable.
        leaf = self.parent / V2_SUPERVISOR_LEAF
        leaf.mkdir(exist_ok=True)
        for pid in _read_pids(self.parent / "cgroup.procs"):
            if pid == os.getpid():
                _write(leaf / "cgroup.procs", pid)
        try:
            _write(self.parent / "cgroup.subtree_control", wanted)
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot enable {wanted} in {self.parent}/cgroup.subtree_control ({exc}); other "
                "processes share this cgroup: run mvm in its own delegated cgroup"
            ) from None

    def create(self, cpu_cores: float, memory_mb: int, max_processes: int) -> None:
        self._delegate()
        self.path.mkdir(exist_ok=True)
        _write(self.path / "memory.max", memory_mb * 1024 * 1024)
        if (self.path / "memory.swap.max").exists():
            _write(self.path / "memory.swap.max", 0)
        _write(self.path / "cpu.max", f"{max(1000, int(cpu_cores * CPU_PERIOD_US))} {CPU_PERIOD_US}")
        _write(self.path / "pids.max", max_processes)

    def _ask_frozen(self) -> None:
        _write(self.path / "cgroup.freeze", 1)

    def thaw(self) -> None:
        if (self.path / "cgroup.freeze").exists():
            _write(self.path / "cgroup.freeze", 0)

    def is_frozen(self) -> bool:
        events = self.path / "cgroup.events"
        if not events.exists():
            return False
        return "frozen 1" in _read(events).splitlines()

    def kill_all(self, timeout: float = 5.0) -> None:
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists() and self.pids():
            try:
                _write(kill_file, 1)
            except OSError:
                pass
        super().kill_all(timeout)

    def cpu_usage_ns(self) -> int:
        for line in _read(self.path / "cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        return 0

    def memory_bytes(self) -> int:
        return int(_read(self.path / "memory.current"))

    def oom_kills(self) -> int:
        for line in _read(self.path / "memory.events").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def for_sandbox(name: str) -> SandboxCgroup:
    """The cgroup(s) a new sandbox called ``name`` will use on this host."""
    if detect_version() == "v2":
        return CgroupV2.for_sandbox(name)
    return CgroupV1.for_sandbox(name)


def from_record(record: dict[str, Any]) -> SandboxCgroup:
    """Rebuild from ``record()`` (for orphan cleanup; only the directories matter)."""
    dirs = [Path(d) for d in record.get("dirs", [])]
    if record.get("version") == "v2":
        return CgroupV2(dirs[0]) if dirs else CgroupV2(Path("/nonexistent"))
    mapping = {str(k): Path(v) for k, v in dict(record.get("controllers") or {}).items()}
    for d in dirs:
        if d not in mapping.values():
            mapping[str(d)] = d
    return CgroupV1(mapping)
