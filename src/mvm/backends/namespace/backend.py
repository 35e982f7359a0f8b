"""The namespace backend: bubblewrap + overlay root + cgroups + seccomp.

One sandbox = one bwrap process tree:

* namespaces: user (its own, see below), pid, net (loopback only), ipc, uts
  (hostname ``sandbox``), cgroup, mount; ``--new-session``, ``--clearenv``,
  ``--cap-drop ALL`` (no capabilities even inside), no_new_privs, the seccomp
  deny-list of ``seccomp.py``; ``--die-with-parent`` (the supervisor is the parent);
* root: ``overlay.py`` (an overlay over the template whose upper layer is on the sandbox's
  own disk: an ext4 image of ``rootfs_size_mb`` on a loop device, ``diskimage.py``);
* limits: ``cgroups.py``, entered between fork and exec;
* capabilities: none, except with idmapped uids, where the sandbox's root keeps
  ``ACCOUNT_CAPS`` (switch user, own and override file modes, signal its users' processes) — all bounded by its own
  user namespace, whose ids are unprivileged host ids — so ``commands.run(user=...)``,
  ``adduser`` and ``chown`` work as in a VM; a process run as another user has none;
* uids: as host root, the sandbox gets its own user namespace mapping sandbox ids
  0..65535 to an unprivileged host range (``IdMap``), bwrap runs as the range's first
  uid, and the template is seen through an idmapped mount so the sandbox's root owns
  its files. Sandbox root is therefore *not* host root. Without idmapped mounts (old
  kernel) sandbox root is host uid 0 without capabilities, and ``describe()`` says so.

What must be undone is recorded in ``<state_dir>/backend/backend.json`` before it is
done, so ``cleanup_orphan`` can finish the job of a supervisor that died.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import (
    BackendUnavailable,
    InvalidArgument,
    InvalidNetworkPolicy,
    InvalidState,
    SandboxError,
)
from ...osutil import exit_description, process_start_time, write_json_atomic
from ..base import Availability, Backend, BackendInstance, SandboxSpec, SnapshotArtifacts
from . import bwrap as bw
from . import cgroups, diskimage, layer, pasta, seccomp
from .keeper_link import KeeperLink
from .overlay import (
    CopyRoot,
    FuseOverlayRoot,
    IdMap,
    IdmapUnsupported,
    OverlayImageRoot,
    OverlayRoot,
    OverlayTmpfsRoot,
    RootLayer,
    make_userns,
    mounts_under,
    probe_idmapped_overlay,
    run_dir_for,
    unmount,
)

log = logging.getLogger("mvm.backends.namespace")

RECORD_NAME = "backend.json"
LOG_NAME = "bwrap.log"
LOG_CAP = 1024 * 1024
SNAPSHOT_FILE = "rootfs-upper.tar"
START_TIMEOUT = 30.0
#: how long start() watches for the agent's first bytes (or an early exit) before returning
AGENT_WAIT = 10.0
ROOT_MODES = ("overlay-image", "overlay-tmpfs", "fuse-overlayfs", "copy")
OVERLAY_MODES = {"overlay-image": OverlayImageRoot, "overlay-tmpfs": OverlayTmpfsRoot}
#: where each root mode keeps what a sandbox writes (``availability().details["disk"]``, doctor)
DISK_KINDS = {
    "overlay-image": "an ext4 image of rootfs_size_mb per sandbox on a loop device (host disk, under MVM_HOME)",
    "overlay-tmpfs": "a tmpfs of rootfs_size_mb per sandbox (memory, charged to memory_mb; no loop devices here)",
    "fuse-overlayfs": "a directory under MVM_HOME (rootfs_size_mb not enforced)",
    "copy": "a copy of the template under MVM_HOME (rootfs_size_mb not enforced)",
}
UID_MODES = ("idmapped", "host-root", "invoking-user")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HIGH_FD = 10

# limits below these cannot run the agent at all
MIN_MEMORY_MB = 32
MIN_ROOTFS_MB = 8
MIN_PROCESSES = 8


def _high(fd: int) -> int:
    """Move ``fd`` to a number >= 10 (close-on-exec) so it can never be the agent's fd 3."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD)
    os.close(fd)
    return new


#: Capabilities the sandbox's root keeps when its uids are an idmapped, unprivileged range: what
#: running commands as another guest account and managing accounts/files needs -- including
#: CAP_KILL, without which the agent could not end (timeout, kill) a command run as another user.
#: They act only on ids, files and processes of the sandbox's own user and pid namespaces
#: (never host-privileged ones).
ACCOUNT_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL")

class _LogDrain(threading.Thread):
    """Reads what bwrap and the agent print (stdout+stderr share one pipe) into
    ``bwrap.log``, at most ``LOG_CAP`` bytes per start: the sandbox writes into that pipe,
    and guest bytes never get unbounded room on the host."""

    def __init__(self, read_fd: int, path: Path):
        super().__init__(name="mvm-ns-log", daemon=True)
        self.read_fd = read_fd
        self.path = path

    def run(self) -> None:
        written = 0
        try:
            with open(self.path, "ab") as log:
                while chunk := os.read(self.read_fd, 65536):
                    if written < LOG_CAP:
                        piece = chunk[: LOG_CAP - written]
                        log.write(piece)
                        log.flush()
                        written += len(piece)
                        if written >= LOG_CAP:
                            log.write(b"\n[mvm: further output of this sandbox start discarded]\n")
                            log.flush()
        except OSError:
            pass
        finally:
            os.close(self.read_fd)


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


class NamespaceInstance(BackendInstance):
    """One sandbox. States: created -> running <-> paused; running/paused -> stopped ->
    running; any -> destroyed."""

    def __init__(self, spec: SandboxSpec, root_mode: str, uid_mode: str, bwrap_binary: str):
        self.spec = spec
        self.root_mode = root_mode
        self.uid_mode = uid_mode
        self._bwrap = bwrap_binary
        self._lock = threading.RLock()
        self._state = "created"
        self._proc: subprocess.Popen[bytes] | None = None
        self._init_pid: int | None = None
        self._keeper: KeeperLink | None = None
        self._on_agent_gone: Callable[[], None] | None = None
        self._pasta: subprocess.Popen[bytes] | None = None  # network mode "open" only
        self._userns_fd: int | None = None
        self.idmap = IdMap.for_sandbox(spec.sandbox_id) if uid_mode == "idmapped" else None
        self.cgroup = cgroups.for_sandbox(f"mvm-{spec.sandbox_id}")
        args = (spec.template.rootfs, spec.backend_dir, spec.resources.rootfs_size_mb, self.idmap)
        self.layer: RootLayer
        if root_mode in OVERLAY_MODES:
            self.layer = OVERLAY_MODES[root_mode](*args, run_dir=run_dir_for(spec.sandbox_id, spec.state_dir))
        elif root_mode == "fuse-overlayfs":
            self.layer = FuseOverlayRoot(*args)
        else:
            self.layer = CopyRoot(*args)

    # ---- bookkeeping ----------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def record_path(self) -> Path:
        return self.spec.backend_dir / RECORD_NAME

    def _write_record(self) -> None:
        proc = self._proc
        write_json_atomic(
            self.record_path,
            {
                "version": 1,
                "sandbox_id": self.spec.sandbox_id,
                "state": self._state,
                "root": self.layer.kind,
                "mounts": self.layer.mounts(),
                "copy_dir": str(self.layer.root) if self.layer.kind == "copy" else None,
                "run_dir": str(self.layer.run_dir) if isinstance(self.layer, OverlayRoot) else None,
                "cgroup": self.cgroup.record(),
                "uid_map": self.uid_map(),
                "bwrap_pid": proc.pid if proc is not None and proc.poll() is None else None,
                "bwrap_starttime": process_start_time(proc.pid) if proc is not None and proc.poll() is None else None,
                **self._pasta_record(),
            },
        )

    def _pasta_record(self) -> dict[str, Any]:
        proc = self._pasta
        if proc is None or proc.poll() is not None:
            return {"pasta_pid": None, "pasta_starttime": None}
        return {"pasta_pid": proc.pid, "pasta_starttime": process_start_time(proc.pid)}

    def uid_map(self) -> dict[str, Any]:
        if self.idmap is not None:
            return {
                "mode": "idmapped",
                **self.idmap.record(),
                "summary": f"sandbox uids 0-{self.idmap.count - 1} are host uids "
                f"{self.idmap.base}-{self.idmap.base + self.idmap.count - 1}: sandbox root is an "
                "unprivileged host user with no capabilities",
            }
        if self.uid_mode == "host-root":
            return {
                "mode": "host-root",
                "sandbox_uid": 0,
                "host_uid": 0,
                "count": 1,
                "summary": "sandbox root is host uid 0 with every capability dropped (no idmapped mounts here)",
            }
        uid = os.getuid()
        return {
            "mode": "invoking-user",
            "sandbox_uid": 0,
            "host_uid": uid,
            "count": 1,
            "summary": f"sandbox root is host uid {uid} (the user running mvm)",
        }

    # ---- lifecycle ------------------------------------------------------------------

    def _prepare(self, populate: Any = None) -> None:
        self.spec.backend_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write_record()  # what we are about to create, before creating it
        if not self.cgroup.exists():
            self.cgroup.create(
                self.spec.resources.cpu_cores, self.spec.resources.memory_mb, self.spec.resources.max_processes
            )
        if self.idmap is not None and self._userns_fd is None:
            self._userns_fd = _high(make_userns(self.idmap))
        if not self.layer.prepared():
            try:
                self.layer.prepare(populate=populate, userns_fd=self._userns_fd)
            except IdmapUnsupported as exc:
                # e.g. the template lives on a file system without idmapped mounts: run the
                # sandbox's root as host root without capabilities, and say so in describe()
                log.warning("idmapped template unavailable (%s); sandbox root will be host uid 0", exc)
                self._drop_idmap()
                self._write_record()
                try:
                    self.layer.prepare(populate=populate, userns_fd=None)
                except OSError as exc2:
                    raise SandboxError(f"could not prepare the sandbox root ({self.layer.kind}): {exc2}") from exc2
            except OSError as exc:
                raise SandboxError(f"could not prepare the sandbox root ({self.layer.kind}): {exc}") from exc

    def _drop_idmap(self) -> None:
        self.idmap = None
        self.layer.idmap = None
        self.uid_mode = "host-root"
        if self._userns_fd is not None:
            os.close(self._userns_fd)
            self._userns_fd = None

    def _launch(self) -> socket.socket:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The agent keeper's own socket (agent/keeper.py): agent deaths and new agents' channels.
        keeper_parent, keeper_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        log_path = self.spec.backend_dir / LOG_NAME
        try:
            keeper_fd = _high(keeper_child.detach())
            fds.append(keeper_fd)
            seccomp_fd = _high(seccomp.filter_fd())
            fds.append(seccomp_fd)
            info_r, info_w = os.pipe2(os.O_CLOEXEC)
            info_r, info_w = _high(info_r), _high(info_w)
            fds += [info_r, info_w]
            log_r, log_fd = os.pipe2(os.O_CLOEXEC)
            fds.append(log_fd)
            log_path.touch(mode=0o600)
            drain = _LogDrain(log_r, log_path)
            drain.start()
            cfg = bw.BwrapConfig(
                root_fd=None,
                root_path=str(self.layer.root),
                userns_fd=self._userns_fd,
                seccomp_fd=seccomp_fd,
                info_fd=info_w,
                command=[*self.spec.template.agent_command, "--fd", str(bw.AGENT_FD), "--restart-fd", str(keeper_fd)],
                shm_bytes=min(64, self.spec.resources.memory_mb) * 1024 * 1024,
                env={"MVM_SANDBOX_ID": self.spec.sandbox_id},
                cap_add=ACCOUNT_CAPS if self.uid_mode == "idmapped" else (),
            )
            keep = [fd for fd in (self._userns_fd, seccomp_fd, info_w, keeper_fd) if fd is not None]
            proc = bw.spawn(
                bw.build_argv(cfg, self._bwrap),
                child.fileno(),
                keep,
                self.cgroup.procs_files(),
                self.idmap.base if self.idmap is not None else None,
                log_fd,
            )
            child.close()
            for fd in (info_w, log_fd):
                os.close(fd)
                fds.remove(fd)
            info = bw.read_info(info_r, proc, START_TIMEOUT)
            if info is None or "child-pid" not in info:
                proc.kill()
                code = proc.wait()
                self.cgroup.kill_all()
                drain.join(timeout=2)
                raise SandboxError(
                    f"bwrap could not start the sandbox (exit {code}): {_log_tail(log_path) or 'no output'}",
                    exit_code=code,
                )
            self._proc = proc
            self._init_pid = int(info["child-pid"])
            if self.spec.network.mode == "open":
                self._start_pasta()
            self._await_agent(parent, keeper_parent, proc, log_path, drain)
            self._keeper = KeeperLink(keeper_parent, self._agent_ended)
            self._keeper.start()
            return parent
        except BaseException:
            parent.close()
            keeper_parent.close()
            raise
        finally:
            child.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _await_agent(
        self, sock: socket.socket, keeper_sock: socket.socket, proc: subprocess.Popen[bytes], log_path: Path,
        drain: threading.Thread,
    ) -> None:
        """Wait (briefly) for the agent's first bytes without consuming them, so that a
        sandbox that failed to set up is reported here with bwrap's words instead of as a
        closed channel. EOF means everything inside exited. A word from the keeper first
        (``agent-ended``: the agent died before it said anything) ends the wait at once: the
        keeper link answers it, and the keeper would otherwise give up waiting for us."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(keeper_sock, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(AGENT_WAIT * 1000)}
        if sock.fileno() not in ready:
            return  # still booting, or its agent died: the caller's handshake decides
        try:
            peek = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        if peek:
            return
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._kill()
        drain.join(timeout=2)  # bwrap's last words
        raise SandboxError(
            f"the sandbox exited during start (bwrap exit {code}): {_log_tail(log_path) or 'no output'}",
            exit_code=code,
        )

    def start(self) -> socket.socket:
        with self._lock:
            if self._state == "destroyed":
                raise InvalidState("the sandbox was destroyed")
            if self._state in ("running", "paused"):
                raise InvalidState(f"the sandbox is already {self._state}; stop it first")
            self._prepare()
            sock = self._launch()
            self._state = "running"
            self._write_record()
            return sock

    def _start_pasta(self) -> None:
        """Network mode open: attach pasta to the sandbox's network namespace (see pasta.py)."""
        assert self._init_pid is not None
        log_path = self.spec.backend_dir / "pasta.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self._pasta = pasta.attach(self._init_pid, self.spec.backend_dir, bw._LAUNCHER.call, log_fd)
        except (RuntimeError, OSError) as exc:
            self._kill()
            raise SandboxError(
                f"network mode open: pasta failed: {exc}: {_log_tail(log_path) or 'no output'}") from None
        finally:
            os.close(log_fd)
        self._write_record()

    def _agent_ended(self) -> None:
        callback = self._on_agent_gone
        if callback is not None:
            callback()

    def watch_agent(self, on_agent_gone: Callable[[], None]) -> bool:
        self._on_agent_gone = on_agent_gone
        return True

    def reconnect_agent(self) -> socket.socket:
        keeper = self._keeper
        if keeper is None:
            raise SandboxError("the sandbox is not running")
        return keeper.new_channel()

    def _kill(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        pasta.stop(self._pasta)
        self._pasta = None
        try:
            self.cgroup.kill_all()
        finally:
            proc, self._proc = self._proc, None
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=10)
            self._init_pid = None

    def stop(self) -> None:
        with self._lock:
            if self._state not in ("running", "paused"):
                return
            self._kill()
            self._state = "stopped"
            self._write_record()

    def pause(self) -> None:
        with self._lock:
            if self._state == "paused":
                return
            if self._state != "running":
                raise InvalidState(f"cannot pause a sandbox that is {self._state}")
            self.cgroup.freeze()
            self._state = "paused"
            self._write_record()

    def resume(self) -> None:
        with self._lock:
            if self._state == "running":
                return
            if self._state != "paused":
                raise InvalidState(f"cannot resume a sandbox that is {self._state}")
            self.cgroup.thaw()
            self._state = "running"
            self._write_record()

    def snapshot(self, dest: Path) -> SnapshotArtifacts:
        with self._lock:
            if self._state in ("created", "destroyed") or not self.layer.prepared():
                raise InvalidState(f"nothing to snapshot: the sandbox is {self._state}")
            dest.mkdir(parents=True, exist_ok=True)
            if any(dest.iterdir()):
                raise InvalidArgument("dest", f"{dest} is not empty", allowed="an empty directory")
            froze = self._state == "running"
            if froze:
                self.cgroup.freeze()  # a consistent view of the files
            try:
                target = dest / SNAPSHOT_FILE
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    members = layer.pack(
                        self.layer.upper,
                        handle,
                        self.idmap.base if self.idmap else 0,
                        self.idmap.count if self.idmap else 0,
                    )
            finally:
                if froze:
                    self.cgroup.thaw()
            return SnapshotArtifacts(
                kind="filesystem",
                files=(SNAPSHOT_FILE,),
                details={
                    "backend": "namespace",
                    "root": self.layer.kind,
                    "layer": "upper" if self.layer.kind != "copy" else "full-copy",
                    "template": self.spec.template.name,
                    "template_digest": self.spec.template.digest,
                    "members": members,
                    "bytes": target.stat().st_size,
                    "memory": False,
                    "processes": False,
                    "note": "only the sandbox's file-system changes are kept; memory and running "
                    "processes are not: a restore starts a fresh agent over these files",
                },
            )

    def restore(self, source: Path, artifacts: SnapshotArtifacts) -> socket.socket:
        if artifacts.kind != "filesystem":
            raise InvalidArgument(
                "artifacts.kind", f"the namespace backend cannot restore {artifacts.kind!r}", allowed=["filesystem"]
            )
        digest = artifacts.details.get("template_digest")
        if digest and digest != self.spec.template.digest:
            raise InvalidArgument("template", f"the snapshot was taken over template digest {digest}", allowed=[digest])
        archive = source / SNAPSHOT_FILE
        if SNAPSHOT_FILE not in artifacts.files or not archive.is_file():
            raise InvalidArgument("source", f"{archive} is missing", allowed=[SNAPSHOT_FILE])
        with self._lock:
            if self._state == "destroyed":
                raise InvalidState("the sandbox was destroyed")
            self.stop()
            self.layer.teardown()

            def populate(upper: Path) -> None:
                with open(archive, "rb") as handle:
                    layer.unpack(handle, upper, self.idmap.base if self.idmap else 0)

            try:
                self._prepare(populate=populate)
            except SandboxError:
                raise
            except (OSError, ValueError) as exc:
                self.layer.teardown()
                raise SandboxError(f"could not restore the snapshot from {source}: {exc}") from exc
            sock = self._launch()
            self._state = "running"
            self._write_record()
            return sock

    def destroy(self) -> None:
        with self._lock:
            if self._state == "destroyed":
                return
            errors = []
            try:
                self._kill()
            except Exception as exc:  # keep tearing down
                errors.append(f"kill: {exc}")
            self._state = "destroyed"
            for step in (self.layer.teardown, self.cgroup.remove):
                try:
                    step()
                except Exception as exc:
                    errors.append(f"{getattr(step, '__qualname__', step)}: {exc}")
            if self._userns_fd is not None:
                os.close(self._userns_fd)
                self._userns_fd = None
            errors += _remove_backend_dir(self.spec.backend_dir)
            if errors:
                raise SandboxError("destroy left something behind: " + "; ".join(errors), errors=errors)

    # ---- facts ----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        res = self.spec.resources
        notes = [
            "isolation: Linux namespaces on the host's kernel (weaker than a VM: a kernel bug is a sandbox escape)",
            "network: loopback only (its own network namespace; no interface to the host or beyond)"
            if self.spec.network.mode != "open" else
            "network mode open (an explicit opt-in): pasta gives the sandbox eth0 10.0.2.15 with full outbound "
            "access; every service on the host's loopback is reachable as 10.0.2.2; pasta runs as host root "
            "(it must join the sandbox's user namespace) and confines itself after setup",
            f"limits: cgroup {self.cgroup.version}: memory {res.memory_mb} MiB (no swap), cpu "
            f"{res.cpu_cores} core(s), {res.max_processes} tasks (threads count; bwrap and the agent "
            "use 3 or more)",
            *self.layer.notes(),
            *(["disk: the root's upper layer is a tmpfs (this host has no loop devices), charged to the "
               f"sandbox's memory: files written count against memory_mb, so a disk filled past {res.memory_mb} "
               "MiB ends in an out-of-memory kill (possibly of the guest agent) before rootfs_size_mb's "
               "'No space left on device'"]
              if self.layer.kind == "overlay-tmpfs" and res.rootfs_size_mb >= res.memory_mb else []),
            *seccomp.POLICY_NOTES,
            "snapshots keep files only (no memory, no processes)",
        ]
        if self.uid_mode == "host-root":
            notes.append(
                "uid: sandbox root is host root (uid 0) without capabilities because this kernel "
                "lacks idmapped overlay layers; a kernel escape would run as host root"
            )
        else:
            notes.append("uid: " + self.uid_map()["summary"])
        return {
            "isolation": "namespace",
            "backend": "namespace",
            "state": self._state,
            "root": self.layer.kind,
            "cgroup": self.cgroup.version,
            "seccomp": True,
            "uid_map": self.uid_map(),
            "limits": {
                "cpu_cores": res.cpu_cores,
                "memory_mb": res.memory_mb,
                "rootfs_size_mb": res.rootfs_size_mb if self.layer.kind in OVERLAY_MODES else None,
                "max_processes": res.max_processes,
            },
            "network": "loopback-only" if self.spec.network.mode != "open" else
                       "open: pasta (eth0 10.0.2.15; the host's loopback is reachable as 10.0.2.2, DNS 10.0.2.3)",
            "notes": notes,
        }

    def host_pids(self) -> list[int]:
        pids = set(self.cgroup.pids()) if self.cgroup.exists() else set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            pids.add(proc.pid)
        return sorted(pids)

    def usage(self) -> dict[str, int]:
        """cgroup counters: cpu time used (ns) and memory charged (bytes)."""
        return {"cpu_ns": self.cgroup.cpu_usage_ns(), "memory_bytes": self.cgroup.memory_bytes()}


def _remove_backend_dir(backend_dir: Path) -> list[str]:
    errors = []
    for mount_point in mounts_under(backend_dir):
        try:
            unmount(mount_point)
        except OSError as exc:
            errors.append(f"unmount {mount_point}: {exc}")
    if not mounts_under(backend_dir):  # never recurse into a live mount
        shutil.rmtree(backend_dir, ignore_errors=True)
    elif not errors:
        errors.append(f"{backend_dir} still has mounts")
    return errors


class NamespaceBackend(Backend):
    """``root_mode`` / ``uid_mode`` force a choice (tests); by default the best available."""

    name = "namespace"
    isolation = "namespace"
    agent_shares_kernel = True
    poolable = True

    def __init__(self, root_mode: str | None = None, uid_mode: str | None = None):
        if root_mode is not None and root_mode not in ROOT_MODES:
            raise InvalidArgument("root_mode", f"unknown mode {root_mode!r}", allowed=list(ROOT_MODES))
        if uid_mode is not None and uid_mode not in UID_MODES:
            raise InvalidArgument("uid_mode", f"unknown mode {uid_mode!r}", allowed=list(UID_MODES))
        self._root_mode = root_mode
        self._uid_mode = uid_mode
        self._availability: Availability | None = None
        self._lock = threading.Lock()

    # ---- host checks ----------------------------------------------------------------

    def _choose(self) -> tuple[str, str]:
        is_root = os.geteuid() == 0
        if self._root_mode is not None:
            root_mode = self._root_mode
        elif is_root:
            root_mode = "overlay-image" if diskimage.support()[0] else "overlay-tmpfs"
        else:
            root_mode = "fuse-overlayfs" if shutil.which("fuse-overlayfs") else "copy"
        if self._uid_mode is not None:
            return root_mode, self._uid_mode
        if not is_root:
            return root_mode, "invoking-user"
        if root_mode in OVERLAY_MODES:
            ok, _ = probe_idmapped_overlay(Path(tempfile.gettempdir()))
            return root_mode, "idmapped" if ok else "host-root"
        return root_mode, "host-root"

    def availability(self) -> Availability:
        """Whether namespace sandboxes can run here: probed once, and the verdict kept for
        the process's life -- unless the probe was killed or timed out, which says nothing
        about namespaces (the OOM killer, a load spike): that answer is given, not kept,
        so a long-lived process (a server, an agent) probes again on its next create."""
        with self._lock:
            if self._availability is not None:
                return self._availability
            found, verdict = self._probe()
            if verdict:
                self._availability = found
            return found

    def _probe(self) -> tuple[Availability, bool]:
        """The probe's answer, and whether it is a verdict (else it was cut short)."""
        try:
            return self._probe_once(), True
        except _ProbeCut as cut:
            return Availability(False, str(cut), cut.details), False

    def _probe_once(self) -> Availability:
        details: dict[str, Any] = {}
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            return Availability(False, f"needs Linux on x86_64 (seccomp filter), not {platform.machine()}", details)
        binary = bw.bwrap_path()
        if binary is None:
            return Availability(False, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap", details)
        details["bwrap"] = bw.bwrap_version(binary) or binary
        argv = [binary, "--unshare-all", *_probe_root(), "true"]
        try:
            run = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise _ProbeCut(f"the probe bwrap did not answer within {PROBE_TIMEOUT} s (an overloaded host?); "
                            f"check by hand with: {shlex.join(argv)}", details) from None
        except (OSError, subprocess.SubprocessError) as exc:
            return Availability(False, f"bwrap does not run: {exc}", details)
        if run.returncode < 0 and -run.returncode != signal.SIGSYS:  # killed from outside: no verdict
            raise _ProbeCut(probe_failure_reason(argv, run.returncode, run.stderr), details)
        if run.returncode != 0:
            return Availability(False, probe_failure_reason(argv, run.returncode, run.stderr), details)
        root_mode, uid_mode = self._choose()
        details["root"] = root_mode
        details["uid_map"] = uid_mode
        if root_mode in OVERLAY_MODES:
            if "overlay" not in Path("/proc/filesystems").read_text():
                return Availability(False, "the kernel has no overlay file system (modprobe overlay)", details)
            if os.geteuid() != 0:
                return Availability(False, f"root mode {root_mode} needs root", details)
        if root_mode == "overlay-image":
            ok, why = diskimage.support()
            if not ok:
                return Availability(False, f"root mode overlay-image: {why}", details)
        details["disk"] = DISK_KINDS[root_mode]
        try:
            version = cgroups.detect_version()
            details["cgroup"] = version
            probe = cgroups.for_sandbox("mvm-availability-probe")
            parents = {d.parent for d in probe.dirs()}
            unwritable = [str(p) for p in parents if not os.access(p, os.W_OK)]
            if unwritable:
                return Availability(
                    False, f"cannot create cgroups (limits would not be enforced) in {unwritable}", details
                )
        except (BackendUnavailable, OSError) as exc:
            return Availability(False, f"cgroups: {exc}", details)
        return Availability(True, "", details)

    # ---- instances ------------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> NamespaceInstance:
        _validate(spec)
        available = self.availability()
        if not available.ok:
            raise BackendUnavailable(f"namespace backend unavailable: {available.reason}")
        root_mode, uid_mode = self._choose()
        binary = bw.bwrap_path() or "bwrap"
        return NamespaceInstance(spec, root_mode, uid_mode, binary)

    def cleanup_orphan(self, state_dir: Path) -> None:
        cleanup_orphan(state_dir)


def _validate(spec: SandboxSpec) -> None:
    if not _ID_RE.fullmatch(spec.sandbox_id):
        raise InvalidArgument(
            "sandbox_id",
            f"{spec.sandbox_id!r} is not a valid id",
            allowed="1-64 of [A-Za-z0-9_.-], not starting with . _ -",
        )
    res = spec.resources
    if not (isinstance(res.cpu_cores, (int, float)) and 0 < res.cpu_cores <= 1024):
        raise InvalidArgument(
            "resources.cpu_cores", f"{res.cpu_cores!r} is out of range", allowed="0 < cpu_cores <= 1024"
        )
    if not (isinstance(res.memory_mb, int) and res.memory_mb >= MIN_MEMORY_MB):
        raise InvalidArgument("resources.memory_mb", f"{res.memory_mb!r} is too small", allowed=f">= {MIN_MEMORY_MB}")
    if not (isinstance(res.rootfs_size_mb, int) and res.rootfs_size_mb >= MIN_ROOTFS_MB):
        raise InvalidArgument(
            "resources.rootfs_size_mb", f"{res.rootfs_size_mb!r} is too small", allowed=f">= {MIN_ROOTFS_MB}"
        )
    if not (isinstance(res.max_processes, int) and res.max_processes >= MIN_PROCESSES):
        raise InvalidArgument(
            "resources.max_processes", f"{res.max_processes!r} is too small", allowed=f">= {MIN_PROCESSES}"
        )
    if spec.network.mode == "open" and pasta.pasta_path() is None:
        raise InvalidNetworkPolicy(
            "network.mode",
            "mode='open' on the namespace backend needs pasta (apt-get install passt); without it a sandbox "
            "has loopback only (egress goes through the host proxy)",
            allowed=["deny", "allow"],
        )
    if spec.network.mode not in ("deny", "allow", "open"):
        raise InvalidNetworkPolicy("network.mode", f"unknown mode {spec.network.mode!r}",
                                   allowed=["deny", "allow", "open"])
    rootfs = spec.template.rootfs
    if not rootfs.is_dir():
        raise InvalidArgument("template", f"{spec.template.name}: {rootfs} is not a built root file system")


def cleanup_orphan(state_dir: Path) -> None:
    """Undo what ``backend.json`` under ``state_dir / "backend"`` says an instance made.
    Idempotent; raises ``SandboxError`` only when something could not be removed."""
    backend_dir = state_dir / "backend"
    record: dict[str, Any] = {}
    try:
        record = json.loads((backend_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        pass
    errors: list[str] = []
    for pid_key, start_key in (("bwrap_pid", "bwrap_starttime"), ("pasta_pid", "pasta_starttime")):
        pid, start = record.get(pid_key), record.get(start_key)
        if isinstance(pid, int) and pid > 0 and start is not None and process_start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if record.get("cgroup"):
        try:
            cgroups.from_record(record["cgroup"]).remove()
        except Exception as exc:
            errors.append(f"cgroup: {exc}")
    if record.get("root") == "overlay-image" and record.get("mounts"):  # the disk: its dirty pages are not written
        diskimage.shut_down(Path(record["mounts"][0]), backend_dir / OverlayImageRoot.IMAGE_NAME)
    for mount_point in reversed(record.get("mounts") or []):
        try:
            unmount(mount_point)
        except OSError as exc:
            errors.append(f"unmount {mount_point}: {exc}")
    # the disk's loop device detaches itself with its mount; one a lazy unmount left is marked to
    errors += diskimage.detach_backed_by(backend_dir)
    run_dir = record.get("run_dir")
    if run_dir:
        for mount_point in mounts_under(Path(run_dir)):
            try:
                unmount(mount_point)
            except OSError as exc:
                errors.append(f"unmount {mount_point}: {exc}")
        for leftover in (Path(run_dir) / "merged", Path(run_dir)):
            with contextlib.suppress(OSError):
                leftover.rmdir()
    if backend_dir.exists():
        errors += _remove_backend_dir(backend_dir)
    if errors:
        raise SandboxError("orphan cleanup left something behind: " + "; ".join(errors), errors=errors)


backend = NamespaceBackend()


#: How long the availability probe (``bwrap ... true``) may take before it counts as cut short.
PROBE_TIMEOUT = 30


class _ProbeCut(Exception):
    """The availability probe was killed or timed out: no verdict on namespaces."""

    def __init__(self, reason: str, details: dict[str, Any]):
        super().__init__(reason)
        self.details = details


def probe_failure_reason(argv: list[str], returncode: int, stderr: str) -> str:
    """Why the availability probe ``argv`` (``bwrap --unshare-all ... true``) failed, and
    what to do: bwrap's own words when it printed any, otherwise how it ended."""
    said = stderr.strip()
    if returncode < 0:  # killed: no verdict on namespaces (availability() probes again next time)
        signum = -returncode
        why = ("a seccomp filter (a container's?) forbids a system call it needs: allow unshare/clone of "
               "namespaces in the container's seccomp profile" if signum == signal.SIGSYS else
               "something outside mvm ended it (the OOM killer, a container's limits, a user): see dmesg")
        return (f"the probe bwrap {exit_description(returncode)} before it could answer whether namespaces "
                f"can be created here{f' (it printed: {said})' if said else ''}; {why}, then check by hand "
                f"with: {shlex.join(argv)}")
    if said:
        return f"bwrap cannot create namespaces here: {said}"
    return (f"bwrap cannot create namespaces here: the probe bwrap {exit_description(returncode)} and printed "
            f"nothing; run it by hand to see: {shlex.join(argv)}")


def _probe_root() -> list[str]:
    """bwrap arguments giving ``true`` a root: just the program folders (bound, or their
    merged-/usr symlinks). Not ``--ro-bind / /``: that re-mounts every host mount read-only,
    and fails when one of them (another sandbox's) goes away meanwhile."""
    argv: list[str] = []
    for name in ("/usr", "/bin", "/sbin", "/lib", "/lib64"):
        if os.path.islink(name):
            argv += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            argv += ["--ro-bind", name, name]
    return argv
