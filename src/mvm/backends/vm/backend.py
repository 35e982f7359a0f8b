"""``VmBackend``: each sandbox is a QEMU ``microvm`` (KVM when it provably works, TCG otherwise).

Files of one instance, all under ``spec.backend_dir``::

    backend.json      what to undo (QEMU pid + start time, socket dir, disk layers)
    disk-N.qcow2      the active overlay and the frozen layers under it
    snapdisk-N.qcow2  a hard link to a restored snapshot's (or the ready snapshot's) disk
    console.log(.1)   the guest serial console, trimmed when it grows past CONSOLE_MAX
    qemu.log          QEMU's own stderr
    agent.sock, qmp.sock  (or in /tmp/mvm-<uid>/<id>/ when the path would be too long)

The QEMU process itself (launch, QMP, console, reaching the agent) is ``machine.py``;
what a snapshot holds and how its memory moves is ``snapshot.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...osutil import write_json_atomic
from ...errors import InvalidArgument, InvalidState, MvmError, SandboxError, SnapshotTampered
from ..base import (
    Availability,
    Backend,
    BackendInstance,
    MemorySink,
    MemorySource,
    SandboxSpec,
    SnapshotArtifacts,
)
from . import disk, ready
from .accel import probe_accelerator
from .initramfs import busybox_path, ensure_initramfs, initramfs_digest
from .kernel import Kernel, ensure_kernel, kernel_obtainable
from .machine import QemuMachine, socket_dir_for
from ...osutil import process_start_time, signal_name
from .process import kill_recorded
from .qemu import (
    MACHINE,
    QemuConfig,
    devices_for,
    kernel_cmdline,
    qemu_binary,
    qemu_img,
    qemu_version,
    vcpus_for,
)
from .deadline import GuestDeadline
from .snapshot import DETAILS_FILE, SNAPSHOT_FORMAT, await_incoming, check_compatible, migrate_memory



def _boot_timeout(accel: str) -> float:
    env = os.environ.get("MVM_VM_BOOT_TIMEOUT")
    if env:
        try:
            return float(env)
        except ValueError:
            raise InvalidArgument("MVM_VM_BOOT_TIMEOUT", f"not a number: {env!r}", allowed="seconds > 0") from None
    return 30.0 if accel == "tcg" else 10.0


class VmBackend(Backend):
    """QEMU microVMs: hardware-virtualisation isolation (or full emulation under TCG)."""

    name = "vm"
    isolation = "vm"

    def __init__(self, use_ready_snapshots: bool = True):
        self.use_ready_snapshots = use_ready_snapshots

    def availability(self) -> Availability:
        missing = []
        if qemu_binary() is None:
            missing.append("qemu-system-x86_64 (apt-get install qemu-system-x86)")
        if qemu_img() is None:
            missing.append("qemu-img (apt-get install qemu-utils)")
        if busybox_path() is None:
            missing.append("a static busybox (apt-get install busybox-static)")
        for tool in ("mkfs.ext4", "resize2fs", "e2fsck"):
            if shutil.which(tool) is None:
                missing.append(f"{tool} (apt-get install e2fsprogs)")
        if missing:
            return Availability(False, "missing: " + ", ".join(missing))
        ok, why = kernel_obtainable()
        if not ok:
            return Availability(False, f"no guest kernel: {why}")
        details: dict[str, Any] = {"qemu": qemu_version(), "machine": MACHINE, "isolation": "vm"}
        try:
            verdict = probe_accelerator()  # cached per kernel + QEMU version after the first probe
        except (MvmError, OSError) as exc:
            return Availability(False, str(exc), details)
        details.update(verdict)
        return Availability(True, "", details)

    def create(self, spec: SandboxSpec) -> VmInstance:
        return VmInstance(self, spec)

    def cleanup_orphan(self, state_dir: Path) -> None:
        backend_dir = state_dir / "backend"
        try:
            record = json.loads((backend_dir / "backend.json").read_text())
        except (OSError, ValueError):
            record = {}
        pid = record.get("pid")
        if isinstance(pid, int):
            kill_recorded(pid, record.get("pid_start_time"))
        sock_dir = record.get("socket_dir")
        if sock_dir and Path(sock_dir) != backend_dir and Path(sock_dir).name == record.get("sandbox_id"):
            shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(backend_dir, ignore_errors=True)


def probe() -> dict[str, Any]:
    """For ``mvmctl doctor``: the accelerator verdict (see ``accel.probe_accelerator``)."""
    return probe_accelerator()


class VmInstance(BackendInstance):
    streams_memory = True

    def __init__(self, backend: VmBackend, spec: SandboxSpec):
        self.backend = backend
        self.spec = spec
        self._lock = threading.RLock()
        self.dir = spec.backend_dir
        res = spec.resources
        if res.memory_mb < 64:
            raise InvalidArgument("memory_mb", f"{res.memory_mb} MiB is too small for a microVM", allowed=">= 64")
        if res.cpu_cores <= 0:
            raise InvalidArgument("cpu_cores", f"{res.cpu_cores} is not positive", allowed="> 0")
        self.vcpus = vcpus_for(res.cpu_cores)
        self.memory_mb = int(res.memory_mb)
        self.net = "user" if spec.network.mode == "open" else None  # a NIC only for the explicit opt-in
        self.devices = devices_for(self.net)
        self.rootfs_size_mb = int(res.rootfs_size_mb)

        # The outermost directory this constructor creates (at most the sandbox's state_dir).
        created_dir = next((d for d in (spec.state_dir, self.dir) if not d.exists()), None)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.socket_dir = socket_dir_for(self.dir, spec.sandbox_id)
            self.kernel: Kernel = ensure_kernel()
            self.initrd = ensure_initramfs(self.kernel)
            verdict = probe_accelerator(kernel=self.kernel)
            self.accel: str = verdict["accel"]
            self.kvm_status: str = verdict["kvm_status"]
            self.base = disk.sized_base(spec.template, self.rootfs_size_mb)
            try:
                self.cmdline = kernel_cmdline(self.accel, [*spec.template.agent_command, "--virtio-port", "agent"],
                                              net=self.net)
            except ValueError as exc:
                raise InvalidArgument("template", str(exc)) from None
            self.boot_timeout = _boot_timeout(self.accel)
        except BaseException:
            # Bad input or a host problem: leave nothing behind.
            if getattr(self, "socket_dir", self.dir) != self.dir:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
            if created_dir is not None:
                shutil.rmtree(created_dir, ignore_errors=True)
            raise

        self.machine = QemuMachine(self.dir, self.socket_dir, on_change=self._write_record)
        self._state = "created"  # created | running | paused | stopped | destroyed
        self._boot: str | None = None  # "cold" | "restored"
        self._layers: list[str] = []  # disk files in this dir, bottom first; the last is active
        self._layer_seq = 0
        self._ready_note = ""
        self._write_record()

    # ------------------------------------------------------------------ paths and records

    def _write_record(self) -> None:
        machine: QemuMachine | None = getattr(self, "machine", None)
        proc = machine.proc if machine is not None else None
        record = {
            "backend": "vm",
            "sandbox_id": self.spec.sandbox_id,
            "pid": proc.pid if proc is not None and proc.poll() is None else None,
            "pid_start_time": process_start_time(proc.pid) if proc is not None and proc.poll() is None else None,
            "socket_dir": str(self.socket_dir),
            "layers": list(getattr(self, "_layers", [])),
            "state": getattr(self, "_state", "created"),
            "boot": getattr(self, "_boot", None),
        }
        if getattr(self, "_state", "") == "destroyed" or not self.dir.is_dir():
            return
        write_json_atomic(self.dir / "backend.json", record)

    def _new_layer_name(self, prefix: str = "disk") -> str:
        self._layer_seq += 1
        while (self.dir / f"{prefix}-{self._layer_seq}.qcow2").exists():
            self._layer_seq += 1
        return f"{prefix}-{self._layer_seq}.qcow2"

    # ------------------------------------------------------------------ QEMU process

    def _config(self, incoming: str | None = None) -> QemuConfig:
        return QemuConfig(
            accel=self.accel,
            vcpus=self.vcpus,
            memory_mb=self.memory_mb,
            kernel=self.kernel.boot_image,
            initrd=self.initrd,
            cmdline=self.cmdline,
            console_log=self.machine.console_log,
            qmp_socket=self.machine.qmp_socket,
            agent_socket=self.machine.agent_socket,
            disk=self.dir / self._layers[-1],
            incoming=incoming,
            net=self.net,
            init_socket=self.machine.init_socket,
        )

    def _launch(self, incoming: str | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.machine.launch(self._config(incoming), pass_fds)

    def _deadline(self, started: float) -> GuestDeadline:
        """The boot/restore budget from ``started``, charged only with the time the launched
        QEMU could run (a busy host stretches it; deadline.py)."""
        deadline = GuestDeadline(self.boot_timeout, started=started)
        if self.machine.proc is not None:
            deadline.watch(self.machine.proc.pid)
        return deadline

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> socket.socket:
        with self._lock:
            if self._state in ("running", "paused"):
                raise InvalidState(f"vm: sandbox {self.spec.sandbox_id} is already {self._state}")
            if self._state == "destroyed":
                raise InvalidState(f"vm: sandbox {self.spec.sandbox_id} was destroyed")
            if self._layers:
                return self._cold_boot()  # re-start after stop(): boot on the kept overlay
            if not self.backend.use_ready_snapshots:
                self._layers.append(self._new_layer_name())
                disk.create_overlay(self.dir / self._layers[-1], self.base, "raw", self.rootfs_size_mb)
                return self._cold_boot()
            key = ready.ready_key(self._ready_parts())
            with ready.building(key):
                found = ready.lookup(key)
                if found is not None:
                    try:
                        return self._restore_from(found, ready.read_details(found), boot="restored",
                                                  idle_agent=True)
                    except MvmError as exc:  # stale or damaged: boot cold and replace it
                        if exc.details.get("qemu_signal"):
                            raise  # QEMU was killed (not by us): the create fails, the snapshot stays
                        self._ready_note = f"ready snapshot failed to restore, rebuilt: {exc.message[:200]}"
                        self._discard_layers()
                        ready.discard(key)
                self._layers.append(self._new_layer_name())
                disk.create_overlay(self.dir / self._layers[-1], self.base, "raw", self.rootfs_size_mb)
                sock = self._cold_boot(keep_hello_socket=True)
                try:
                    staged = ready.staging_dir(key)
                    try:
                        artifacts = self._snapshot_into(staged)
                        ready.publish(key, staged, self._ready_parts(), artifacts.details)
                        ready.prune(protect=key)
                    except Exception:
                        shutil.rmtree(staged, ignore_errors=True)
                        raise
                except (MvmError, OSError) as exc:  # the sandbox itself is fine: it just booted cold
                    self._ready_note = f"could not save the ready snapshot: {exc}"[:300]
                # A fresh connection for the caller: our hello stays on ours.
                sock.close()
                return self.machine.connect_agent(time.monotonic() + 10)

    def _ready_parts(self) -> dict[str, Any]:
        st = self.base.stat()
        return {
            "template": self.spec.template.digest,
            "base": [str(self.base), st.st_size, st.st_mtime_ns, st.st_ino],
            "kernel": self.kernel.version,
            "initramfs": initramfs_digest(self.initrd),
            "qemu": qemu_version(),
            "accel": self.accel,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "rootfs_size_mb": self.rootfs_size_mb,
            "cmdline": self.cmdline,
            "devices": list(self.devices),
        }

    def _cold_boot(self, keep_hello_socket: bool = False) -> socket.socket:
        started = time.monotonic()
        self.machine.rotate_console()
        self._launch()
        sock = self.machine.await_agent(self._deadline(started), accel=self.accel)
        self._state = "running"
        self._boot = "cold"
        self.boot_seconds = time.monotonic() - started
        self._write_record()
        if keep_hello_socket:
            return sock
        sock.close()
        return self.machine.connect_agent(time.monotonic() + 10)

    def stop(self) -> None:
        with self._lock:
            if self._state not in ("running", "paused"):
                return
            self.machine.quit()
            self._state = "stopped"
            self._write_record()

    def pause(self) -> None:
        with self._lock:
            self._require("running", "paused")
            assert self.machine.qmp is not None
            self.machine.qmp.execute("stop")
            self._state = "paused"
            self._write_record()

    def resume(self) -> None:
        with self._lock:
            self._require("running", "paused")
            assert self.machine.qmp is not None
            self.machine.qmp.execute("cont")
            self._state = "running"
            self._write_record()

    def _require(self, *states: str) -> None:
        if self._state not in states:
            raise InvalidState(
                f"vm: sandbox {self.spec.sandbox_id} is {self._state}; this needs one of {', '.join(states)}"
            )
        if not self.machine.alive():
            self.machine.kill()
            self._state = "stopped"
            raise SandboxError(f"vm: QEMU is no longer running: {self.machine.diagnostics()}")

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, dest: Path, *, memory_sink: MemorySink | None = None) -> SnapshotArtifacts:
        with self._lock:
            self._require("running", "paused")
            dest.mkdir(parents=True, exist_ok=True)
            if any(dest.iterdir()):
                raise InvalidArgument("dest", f"snapshot directory {dest} is not empty", allowed="an empty directory")
            try:
                return self._snapshot_into(dest, memory_sink)
            except BaseException:
                for name in (ready.MEMORY_FILE, ready.DISK_FILE, DETAILS_FILE):  # no half snapshot
                    (dest / name).unlink(missing_ok=True)
                raise

    def _snapshot_into(self, dest: Path, memory_sink: MemorySink | None = None) -> SnapshotArtifacts:
        """Stop, freeze the disk, stream memory to ``dest`` (or ``memory_sink``), continue;
        disk layer copied last."""
        assert self.machine.qmp is not None
        qmp = self.machine.qmp
        # Straight into the sealer when there is one: no plain memory image on disk.
        target = f"exec:{memory_sink.command()}" if memory_sink is not None else None
        t0 = time.monotonic()
        was_running = qmp.status() == "running"
        if was_running:
            qmp.execute("stop")
        memory = dest / ready.MEMORY_FILE
        frozen = self._layers[-1]
        try:
            # Freeze the disk at this instant: the VM continues on a new overlay over it.
            new_layer = self._new_layer_name()
            qmp.execute(
                "blockdev-snapshot-sync",
                device="disk0",
                **{"snapshot-file": str(self.dir / new_layer), "format": "qcow2", "mode": "absolute-paths"},
            )
            os.chmod(self.dir / new_layer, 0o600)
            self._layers.append(new_layer)
            self._write_record()
            if target is None:
                os.close(os.open(memory, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))  # cat keeps the mode
                target = f"exec:cat > {shlex.quote(str(memory))}"
            migrate_memory(qmp, target)
        finally:
            if was_running:
                qmp.execute("cont")
        paused_seconds = time.monotonic() - t0
        disk.flatten_onto(self.dir / frozen, self.base, dest / ready.DISK_FILE)
        # The sealer finishes (its last chunks, fsync) while the disk layer is copied.
        memory_bytes = memory.stat().st_size if memory_sink is None else memory_sink.finish()
        details = {
            "format": SNAPSHOT_FORMAT,
            "backend": "vm",
            "qemu_version": qemu_version(),
            "machine": MACHINE,
            "accel": self.accel,
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "devices": list(self.devices),
            "kernel_version": self.kernel.version,
            "initramfs": initramfs_digest(self.initrd),
            "cmdline": self.cmdline,
            "template": self.spec.template.name,
            "template_digest": self.spec.template.digest,
            "rootfs_size_mb": self.rootfs_size_mb,
            "base_disk": str(self.base.resolve()),
            "base_disk_size": self.base.stat().st_size,
            "base_disk_mtime_ns": str(self.base.stat().st_mtime_ns),  # > 2**53: kept as text for canonical JSON
            "was_running": was_running,
            "memory_bytes": memory_bytes,
            "disk_bytes": (dest / ready.DISK_FILE).stat().st_size,
            "paused_seconds": round(paused_seconds, 4),
            "saved_seconds": round(time.monotonic() - t0, 4),
        }
        (dest / DETAILS_FILE).write_text(json.dumps(details, indent=2) + "\n")
        os.chmod(dest / DETAILS_FILE, 0o600)
        return SnapshotArtifacts(kind="full", files=(ready.MEMORY_FILE, ready.DISK_FILE, DETAILS_FILE), details=details,
                                 streamed=(ready.MEMORY_FILE,) if memory_sink is not None else ())

    def restore(self, source: Path, artifacts: SnapshotArtifacts, *,
                memory_source: MemorySource | None = None) -> socket.socket:
        with self._lock:
            if self._state == "destroyed":
                raise InvalidState(f"vm: sandbox {self.spec.sandbox_id} was destroyed")
            if artifacts.kind != "full":
                raise InvalidArgument(
                    "snapshot", f"a {artifacts.kind!r} snapshot cannot restore a VM", allowed=["full"]
                )
            details = dict(artifacts.details)
            if not details:
                try:
                    details = json.loads((source / DETAILS_FILE).read_text())
                except (OSError, ValueError):
                    raise SandboxError(f"vm: snapshot {source} has no {DETAILS_FILE}") from None
            if self._state in ("running", "paused"):
                self.machine.kill()
                self._state = "stopped"
            self._discard_layers()
            return self._restore_from(source, details, boot="restored", memory_source=memory_source)

    def _check_compatible(self, details: dict[str, Any]) -> None:
        mine: dict[str, Any] = {
            "qemu_version": qemu_version(),
            "machine": MACHINE,
            "accel": self.accel,
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "devices": list(self.devices),
            "kernel_version": self.kernel.version,
            "template_digest": self.spec.template.digest,
        }
        check_compatible(mine, details)

    def _restore_from(self, source: Path, details: dict[str, Any], boot: str,
                      memory_source: MemorySource | None = None, idle_agent: bool = False) -> socket.socket:
        """``idle_agent``: the snapshot was taken with the agent idle right after its hello
        on a connection that stayed open (a ready snapshot), so nothing of an earlier host
        is in flight and the guest may go on with that session."""
        self._check_compatible(details)
        memory = source / ready.MEMORY_FILE
        snap_disk = source / ready.DISK_FILE
        if (memory_source is None and not memory.is_file()) or not snap_disk.is_file():
            raise SandboxError(f"vm: snapshot {source} lacks {ready.MEMORY_FILE} or {ready.DISK_FILE}")
        started = time.monotonic()
        pinned = self._new_layer_name("snapdisk")
        disk.link_or_copy(snap_disk, self.dir / pinned)
        self._layers.append(pinned)
        top = self._new_layer_name()
        disk.create_overlay(self.dir / top, self.dir / pinned, "qcow2")
        self._layers.append(top)
        self._write_record()
        self.machine.rotate_console()
        try:
            if memory_source is not None:
                self._launch(incoming=f"exec:{memory_source.command()}")
            else:
                # QEMU reads a plain memory image (the ready snapshot) straight from the file:
                # ``fd:`` instead of ``exec:cat`` spares a shell, a cat and a pipe, and more than
                # halves the incoming migration of a ready snapshot (~130 -> ~50 ms under TCG here).
                memory_fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._launch(incoming=f"fd:{memory_fd}", pass_fds=(memory_fd,))
                finally:
                    os.close(memory_fd)  # QEMU has its own
            assert self.machine.qmp is not None
            deadline = self._deadline(started)
            status = await_incoming(self.machine.qmp, deadline)
            if memory_source is not None:
                # The unsealer authenticated every chunk before QEMU got its bytes (so a load
                # can only complete on the whole, authentic image); its verdict comes first.
                memory_source.finish(max(deadline.wall_limit - time.monotonic(), 5.0))
            sock = None
            if idle_agent and status != "running":
                # Connecting before ``cont`` keeps the port's host side "connected" across the
                # restore, so virtio-serial's post-load check sends the guest no close/open pair:
                # the agent just reads our hello (instead of ending its session, logging and
                # polling every 50 ms for a host: ~100 ms less under TCG here). Not for other
                # snapshots: output the guest had queued for its old host would reach us first.
                sock = self.machine.connect_agent(deadline.wall_limit)
            if status != "running":
                self.machine.qmp.execute("cont")
            if sock is None:
                sock = self.machine.connect_agent(deadline.wall_limit)
        except (SandboxError, SnapshotTampered) as exc:
            signum = self.machine.killed_by()
            diag = self.machine.diagnostics()
            self.machine.kill()
            self._state = "stopped"
            if memory_source is not None and not isinstance(exc, SnapshotTampered):
                try:  # a stream that failed authentication explains a failed load best
                    memory_source.finish(2.0)
                except SnapshotTampered as tampered:
                    raise tampered from None
                except MvmError:
                    pass
            if isinstance(exc, SnapshotTampered):
                raise
            # QEMU killed from outside says nothing of the snapshot: ``start`` does not fall back
            said = exc.details.get("qemu_signal")
            killed = {"qemu_signal": signum or said} if signum or said else {}
            prefix = f"vm: QEMU was killed by {signal_name(signum)} during the restore: " if signum and not said else ""
            raise SandboxError(f"{prefix}{exc.message}; {diag}", **killed) from None
        self._state = "running"
        self._boot = boot
        self.boot_seconds = time.monotonic() - started
        self._write_record()
        return sock

    def _discard_layers(self) -> None:
        for name in self._layers:
            (self.dir / name).unlink(missing_ok=True)
        self._layers = []
        self._write_record()

    # ------------------------------------------------------------------ teardown and facts

    def destroy(self) -> None:
        with self._lock:
            if self._state == "destroyed":
                return
            self.machine.kill()
            self._state = "destroyed"
            if self.socket_dir != self.dir:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
            shutil.rmtree(self.dir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        notes = [
            f"microVM: QEMU {MACHINE}, accelerator {self.accel} ({self.kvm_status})",
        ]
        if self.accel == "tcg":
            notes.append(
                "software emulation (TCG): no hardware virtualisation; guest code runs 10-50x slower than native"
            )
            notes.append(
                "guest ASLR is off (kernel arg norandmaps): under TCG it makes every process start ~3x "
                "faster; a security trade-off inside the guest only"
            )
        notes.append(
            "restored clones share the guest kernel's KASLR layout, and its boot_id if it was read before "
            "the snapshot (it cannot be changed from userspace); the supervisor re-seeds their RNG after restore"
        )
        notes.append(
            f"limits: memory {self.memory_mb} MiB and {self.vcpus} vCPU(s) by QEMU, disk {self.rootfs_size_mb} MiB "
            f"by the image's size, {self.spec.resources.max_processes} tasks by a pids cgroup in the guest that "
            "the agent and every process it starts are in (details.guest_limits says whether it took effect)"
        )
        if self.net:
            notes.append("network mode open: full outbound access through QEMU user networking (an explicit "
                         "opt-in); every service on the host's loopback is reachable as 10.0.2.2")
        if self._ready_note:
            notes.append(self._ready_note)
        return {
            "isolation": "vm",
            "backend": "vm",
            "accel": self.accel,
            "kvm_status": self.kvm_status,
            "machine": MACHINE,
            "qemu_version": qemu_version(),
            "kernel_version": self.kernel.version,
            "kernel_release": self.kernel.release,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "rootfs_size_mb": self.rootfs_size_mb,
            "boot": self._boot,
            "boot_seconds": round(getattr(self, "boot_seconds", 0.0), 3) or None,
            "state": self._state,
            "guest_aslr": self.accel != "tcg",
            "network": ("open: QEMU user networking (slirp NIC, guest 10.0.2.15; the host's loopback is "
                        "reachable as 10.0.2.2, DNS 10.0.2.3)") if self.net else
                       "none (no network device; loopback only)",
            "notes": notes,
        }

    def watch_agent(self, on_agent_gone: Callable[[], None]) -> bool:
        self.machine.on_agent_ended = on_agent_gone
        return True

    def reconnect_agent(self) -> socket.socket:
        # The dead agent's connection is closed by now (begin_restart): QEMU discarded what
        # the guest had queued on it, so this connection is a clean stream. Then the keeper
        # may start the new agent.
        sock = self.machine.connect_agent(time.monotonic() + 10)
        self.machine.let_agent_start()
        return sock

    def agent_limits(self) -> dict[str, Any]:
        return {"max_processes": self.spec.resources.max_processes}

    def host_pids(self) -> list[int]:
        proc = self.machine.proc
        return [proc.pid] if proc is not None and self.machine.alive() else []


__all__ = ["VmBackend", "VmInstance", "probe"]
