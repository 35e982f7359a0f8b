"""The microVM backend against real QEMU (TCG on this machine), the real guest agent and a real
template. VMs are shared per module where a test only reads; lifecycle tests make their own."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_for

from mvm.backends.base import SnapshotArtifacts
from mvm.backends.vm import VmBackend, VmInstance, probe_accelerator, ready
from mvm.backends.vm.machine import CONSOLE_MAX, trim_console
from mvm.backends.vm.accel import kvm_device_status
from mvm.errors import InvalidArgument, SandboxError
from mvm.protocol import codec
from mvm.protocol.channel import FramedChannel
from mvm.templates.image import TemplateImage

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(240)]


class Agent:
    """A tiny supervisor stand-in: the framed protocol over the socket a backend returned."""

    def __init__(self, sock: Any, timeout: float = 60.0):
        sock.settimeout(timeout)
        self.channel = FramedChannel(sock)
        self.hello = self.channel.handshake("supervisor")
        self._ids = itertools.count(1)
        self._events: list[Any] = []

    def request(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        ident = next(self._ids)
        self.channel.send_raw(codec.request(ident, op, args or {}))
        while True:
            frame = self.channel.recv()
            h = frame.header
            if h["kind"] == "response" and h["id"] == ident:
                if not h["ok"]:
                    raise AssertionError(f"{op} failed: {h['error']}")
                return dict(h.get("result") or {})
            if h["kind"] == "event":
                self._events.append(frame)

    def start(self, argv: list[str]) -> int:
        return int(self.request("proc.start", {"argv": argv, "env": {}, "stdin": False})["pid"])

    def wait(self, pid: int) -> tuple[int, bytes, bytes]:
        out, err = b"", b""
        while True:
            for frame in list(self._events):
                h = frame.header
                if h.get("pid") != pid:
                    continue
                self._events.remove(frame)
                if h["event"] == "proc.output":
                    if h["stream"] == "stdout":
                        out += frame.payload
                    else:
                        err += frame.payload
                elif h["event"] == "proc.exit":
                    return int(h["exit_code"]), out, err
            frame = self.channel.recv()
            if frame.header["kind"] == "event":
                self._events.append(frame)

    def run(self, argv: list[str]) -> tuple[int, str]:
        code, out, err = self.wait(self.start(argv))
        return code, (out + err).decode(errors="replace")

    def sh(self, script: str) -> str:
        code, output = self.run(["/bin/sh", "-c", script])
        assert code == 0, f"{script!r} exited {code}: {output}"
        return output

    def configure(self, entropy: bytes) -> None:
        self.request("agent.configure", {"env": {}, "clock_epoch": time.time(), "entropy_hex": entropy.hex()})

    def close(self) -> None:
        self.channel.close()



@dataclass
class Booted:
    instance: VmInstance
    agent: Agent
    boot_id: str = ""


@pytest.fixture(scope="module")
def booted(make_instance) -> Iterator[Booted]:  # type: ignore[no-untyped-def]
    """One cold-booted VM: 1.5 cores (→ 2 vCPUs), 384 MiB."""
    instance = make_instance(cpu_cores=1.5, memory_mb=384)
    agent = Agent(instance.start())
    yield Booted(instance, agent)
    agent.close()
    instance.destroy()


@pytest.fixture(scope="module")
def snapshot_of_booted(booted: Booted, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SnapshotArtifacts, int]:
    """A snapshot of ``booted`` holding a running process, a tmpfs file and a disk file; the source
    writes another disk file right after it."""
    agent = booted.agent
    pid = agent.start(["/bin/sleep", "3600"])
    agent.sh("echo in-tmpfs > /tmp/before.txt; echo on-disk > /root/before.txt; sync")
    booted.boot_id = agent.sh("cat /proc/sys/kernel/random/boot_id").strip()
    dest = tmp_path_factory.mktemp("snap")
    artifacts = booted.instance.snapshot(dest)
    agent.sh("echo after > /root/after.txt; sync")
    return dest, artifacts, pid


def test_boot_runs_a_command_through_the_agent(booted: Booted) -> None:
    assert booted.agent.hello["role"] == "agent"
    code, out = booted.agent.run(["/bin/echo", "hello from the vm"])
    assert (code, out) == (0, "hello from the vm\n")
    facts = booted.instance.describe()
    assert facts["isolation"] == "vm" and facts["machine"] == "microvm" and facts["boot"] == "cold"


def test_cpu_and_memory_are_visible_in_the_guest(booted: Booted) -> None:
    assert booted.agent.sh("nproc").strip() == "2"  # 1.5 cores round up
    mem_kb = int(booted.agent.sh("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert 300 * 1024 < mem_kb <= 384 * 1024  # the kernel keeps a little for itself


def test_rootfs_is_sized_and_tmp_is_tmpfs(booted: Booted) -> None:
    size_mb = int(booted.agent.sh("df -m / | awk 'NR==2 {print $2}'"))
    assert 900 <= size_mb <= 1024
    assert "tmpfs" in booted.agent.sh("awk '$2==\"/tmp\" {print $3}' /proc/mounts")


def test_guest_has_no_network_device(booted: Booted) -> None:
    assert booted.agent.sh("ls /sys/class/net").split() == ["lo"]


def test_kvm_probe_verdict_picks_the_accelerator(booted: Booted) -> None:
    verdict = probe_accelerator()
    facts = booted.instance.describe()
    assert facts["accel"] == verdict["accel"] and facts["kvm_status"] == verdict["kvm_status"]
    if verdict["kvm_status"].startswith("kvm: usable"):
        assert verdict["accel"] == "kvm"
    else:
        assert verdict["accel"] == "tcg"
        assert any("norandmaps" in note for note in facts["notes"])
    if Path("/sys/module/kvm_pvm").exists():  # this machine: a PVM hypervisor that hangs guests
        assert kvm_device_status()[0]
        assert verdict["kvm_status"] == "kvm: unusable (guest did not boot)"
        assert verdict["accel"] == "tcg"


def test_forcing_kvm_that_cannot_boot_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    if probe_accelerator()["accel"] == "kvm":
        pytest.skip("KVM works on this host")
    monkeypatch.setenv("MVM_ACCEL", "kvm")
    with pytest.raises(Exception, match="MVM_ACCEL=kvm but kvm: un"):
        probe_accelerator()
    monkeypatch.setenv("MVM_ACCEL", "hvf")
    with pytest.raises(InvalidArgument, match="MVM_ACCEL"):
        probe_accelerator()


def test_pause_freezes_the_guest_and_resume_continues(booted: Booted) -> None:
    agent = booted.agent
    # each value replaces the last whole: a read never sees a torn one
    loop = "i=0; while :; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.05; done"
    pid = agent.start(["/bin/sh", "-c", loop])

    def count() -> int:
        return int(agent.sh("cat /tmp/counter 2>/dev/null || echo 0"))

    ticks = 20  # what the guest counts while the host watches it run, then must not while paused
    try:
        a = count()
        started = time.monotonic()
        wait_for(lambda: count() >= a + ticks, f"the guest to count {ticks} ticks", timeout=120)
        running = time.monotonic() - started  # how long that took here and now (TCG, the load)
        b = count()
        booted.instance.pause()
        assert booted.instance.describe()["state"] == "paused"
        time.sleep(3 * running)  # the pause under test: a running guest would count 3x ``ticks`` meanwhile
        booted.instance.resume()
        c = count()
        assert c - b < ticks, (a, b, c)  # nothing counted while paused (a read on either side may tick)
        wait_for(lambda: count() >= c + ticks, "the guest to count again after resume", timeout=120)
    finally:
        agent.request("proc.signal", {"pid": pid, "signal": "KILL", "group": True})


def test_request_sent_while_paused_is_answered_after_resume(booted: Booted) -> None:
    booted.instance.pause()
    try:
        booted.agent.channel.send_raw(
            codec.request(9999, "ping", {})
        )
        time.sleep(0.5)
    finally:
        booted.instance.resume()
    frame = booted.agent.channel.recv()
    while frame.header["kind"] != "response":
        frame = booted.agent.channel.recv()
    assert frame.header["id"] == 9999 and frame.header["ok"]


def test_snapshot_is_full_and_records_what_restore_needs(
    snapshot_of_booted: tuple[Path, SnapshotArtifacts, int],
) -> None:
    dest, artifacts, _ = snapshot_of_booted
    assert artifacts.kind == "full"
    assert set(artifacts.files) == {"memory.bin", "disk.qcow2", "vm.json"}
    for name in artifacts.files:
        assert (dest / name).stat().st_mode & 0o077 == 0  # memory images are private
    details = artifacts.details
    for key in ("qemu_version", "machine", "memory_mb", "vcpus", "devices", "kernel_version", "template_digest"):
        assert key in details
    info = json.loads(
        subprocess.run(["qemu-img", "info", "-U", "--output=json", str(dest / "disk.qcow2")],
                       capture_output=True, text=True, check=True).stdout
    )
    assert Path(info["full-backing-filename"]).is_absolute()
    check = subprocess.run(["qemu-img", "check", "-U", str(dest / "disk.qcow2")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_restore_keeps_processes_tmpfs_and_disk_but_not_later_source_writes(
    make_instance, snapshot_of_booted: tuple[Path, SnapshotArtifacts, int], tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    dest, artifacts, pid = snapshot_of_booted
    clone = make_instance(cpu_cores=1.5, memory_mb=384)
    agent = Agent(clone.restore(dest, artifacts))
    try:
        assert clone.describe()["boot"] == "restored"
        assert agent.sh(f"kill -0 {pid} && cat /proc/{pid}/cmdline | tr '\\0' ' '").strip() == "/bin/sleep 3600"
        assert agent.sh("cat /tmp/before.txt") == "in-tmpfs\n"
        assert agent.sh("cat /root/before.txt") == "on-disk\n"
        # The disk was frozen at the snapshot: what the source wrote afterwards is not here.
        assert agent.sh("test -e /root/after.txt && echo yes || echo no").strip() == "no"
        # ...and the clone writes to a disk of its own.
        agent.sh("echo clone > /root/clone.txt; sync")
        # A snapshot of the clone stands alone (its disk layers are flattened onto the base).
        second = tmp_path / "of-clone"
        second_artifacts = clone.snapshot(second)
        agent.close()
        clone.destroy()
        grandchild = make_instance(cpu_cores=1.5, memory_mb=384)
        agent = Agent(grandchild.restore(second, second_artifacts))
        assert agent.sh("cat /root/clone.txt /root/before.txt /tmp/before.txt") == "clone\non-disk\nin-tmpfs\n"
        assert agent.sh(f"kill -0 {pid} && echo alive").strip() == "alive"
        grandchild.destroy()
    finally:
        agent.close()
        clone.destroy()


_RANDOM_PROBE = "cat /proc/sys/kernel/random/boot_id; cat /proc/sys/kernel/random/uuid; head -c16 /dev/urandom | od -x"
# What agent.configure must do with entropy_hex after a restore: credit it and force a CRNG reseed
# (a plain write to /dev/urandom only mixes it into the input pool; the CRNG keeps its state).
_RESEED = (
    "import fcntl, os, struct; data = bytes.fromhex(os.environ['E']); fd = os.open('/dev/urandom', os.O_WRONLY); "
    "fcntl.ioctl(fd, 0x40085203, struct.pack('ii', len(data) * 8, len(data)) + data); fcntl.ioctl(fd, 0x5207)"
)


@pytest.fixture
def two_clones(make_instance, snapshot_of_booted: tuple[Path, SnapshotArtifacts, int]):  # type: ignore[no-untyped-def]
    dest, artifacts, _ = snapshot_of_booted
    clones = [make_instance(cpu_cores=1.5, memory_mb=384) for _ in range(2)]
    agents = [Agent(c.restore(dest, artifacts)) for c in clones]
    yield agents
    for agent in agents:
        agent.close()
    for clone in clones:
        clone.destroy()


def test_two_restores_of_one_snapshot_run_at_once_on_their_own_disks(
    two_clones: list[Agent], booted: Booted
) -> None:
    for n, agent in enumerate(two_clones):
        agent.sh(f"echo clone-{n} > /root/who.txt; sync")
    for n, agent in enumerate(two_clones):
        assert agent.sh("cat /root/who.txt") == f"clone-{n}\n"
        # boot_id is fixed once read; read before the snapshot, clones share it (said in describe()).
        assert agent.sh("cat /proc/sys/kernel/random/boot_id").strip() == booted.boot_id


def test_clones_diverge_once_their_crng_is_reseeded(two_clones: list[Agent]) -> None:
    outputs = []
    for agent in two_clones:
        script = _RESEED.replace("os.environ['E']", repr(os.urandom(32).hex()))
        code, out = agent.run(["/usr/bin/python3", "-c", script])
        assert code == 0, out
        outputs.append(agent.sh(_RANDOM_PROBE).splitlines())
    assert outputs[0][1] != outputs[1][1]
    assert outputs[0][2:] != outputs[1][2:]


def test_agent_configure_entropy_makes_clones_diverge(two_clones: list[Agent]) -> None:
    outputs = []
    for n, agent in enumerate(two_clones):
        agent.configure(os.urandom(32) + bytes([n]))
        outputs.append(agent.sh(_RANDOM_PROBE).splitlines())
    assert outputs[0][1] != outputs[1][1]
    assert outputs[0][2:] != outputs[1][2:]


def test_restore_refuses_a_snapshot_of_another_shape(
    make_instance, snapshot_of_booted: tuple[Path, SnapshotArtifacts, int]  # type: ignore[no-untyped-def]
) -> None:
    dest, artifacts, _ = snapshot_of_booted
    other = make_instance(cpu_cores=1, memory_mb=256)
    with pytest.raises(InvalidArgument, match=r"memory_mb: snapshot has 384, this sandbox has 256") as err:
        other.restore(dest, artifacts)
    assert err.value.field == "snapshot"
    assert other.host_pids() == []


def test_stop_keeps_the_disk_and_start_boots_it_again(make_instance) -> None:  # type: ignore[no-untyped-def]
    instance = make_instance()
    agent = Agent(instance.start())
    agent.sh("echo kept > /root/kept.txt; sync")
    agent.close()
    instance.stop()
    assert instance.host_pids() == [] and instance.describe()["state"] == "stopped"
    agent = Agent(instance.start())
    assert agent.sh("cat /root/kept.txt") == "kept\n"
    agent.close()
    instance.destroy()


def test_second_create_restores_the_ready_snapshot(make_instance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = make_instance(ready=True, memory_mb=320)
    ready.discard(ready.ready_key(first._ready_parts()))  # start from a cold cache for this shape
    agent = Agent(first.start())
    assert first.describe()["boot"] == "cold"
    assert agent.sh("echo first > /root/mine.txt; cat /root/mine.txt") == "first\n"

    second = make_instance(ready=True, memory_mb=320)
    agent2 = Agent(second.start())
    assert second.describe()["boot"] == "restored"
    assert agent2.sh("echo $((6 * 7))").strip() == "42"
    # The first sandbox's own writes after its ready snapshot are not in the second.
    assert agent2.sh("test -e /root/mine.txt && echo yes || echo no").strip() == "no"
    assert agent.sh("cat /root/mine.txt") == "first\n"  # and the first goes on on its own overlay
    # A VM that already gave its ready snapshot can be snapshotted again.
    assert first.snapshot(tmp_path / "again").kind == "full"
    for a in (agent, agent2):
        a.close()
    for i in (first, second):
        i.destroy()


def test_destroy_leaves_no_process_and_no_files(make_instance) -> None:  # type: ignore[no-untyped-def]
    instance = make_instance(ready=True)
    agent = Agent(instance.start())
    pids = instance.host_pids()
    assert pids and Path(f"/proc/{pids[0]}").exists()
    socket_dir = instance.socket_dir
    agent.close()
    instance.destroy()
    assert not Path(f"/proc/{pids[0]}").exists()
    assert not instance.spec.backend_dir.exists()
    assert not socket_dir.exists() or socket_dir == instance.spec.backend_dir


def test_cleanup_orphan_kills_qemu_and_removes_files(make_instance) -> None:  # type: ignore[no-untyped-def]
    instance = make_instance(ready=True)
    sock = instance.start()
    pid = instance.host_pids()[0]
    # The supervisor "died": only what it recorded on disk is left.
    VmBackend().cleanup_orphan(instance.spec.state_dir)
    sock.close()
    wait_for(lambda: not _is_qemu(pid), "the orphaned QEMU to be gone")
    assert not instance.spec.backend_dir.exists()
    VmBackend().cleanup_orphan(instance.spec.state_dir)  # idempotent


def _is_qemu(pid: int) -> bool:
    """Whether ``pid`` is (still) a QEMU process (a reused pid is not)."""
    try:
        return "qemu" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


@dataclass(frozen=True)
class _NoAgentTemplate(TemplateImage):
    @property
    def agent_command(self) -> list[str]:
        return ["/usr/bin/tail", "-f", "/dev/null", "--"]  # runs forever, never opens the agent port


def test_boot_without_an_agent_times_out_with_a_clear_error(
    make_instance, vm_template: TemplateImage, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("MVM_VM_BOOT_TIMEOUT", "8")
    template = _NoAgentTemplate(
        name=vm_template.name, digest=vm_template.digest, directory=vm_template.directory,
        suite=vm_template.suite, python_version=vm_template.python_version,
    )
    instance = make_instance(template=template)
    with pytest.raises(SandboxError, match="did not answer within 8 s") as err:  # its own timeout, not a hang
        instance.start()
    assert "console tail" in err.value.message
    assert instance.host_pids() == []


@dataclass(frozen=True)
class _MissingAgentTemplate(TemplateImage):
    @property
    def agent_command(self) -> list[str]:
        return ["/opt/nowhere/mvm-agent"]


def test_boot_with_a_missing_agent_fails_fast_and_says_why(
    make_instance, vm_template: TemplateImage  # type: ignore[no-untyped-def]
) -> None:
    template = _MissingAgentTemplate(
        name=vm_template.name, digest=vm_template.digest, directory=vm_template.directory,
        suite=vm_template.suite, python_version=vm_template.python_version,
    )
    instance = make_instance(template=template)
    # fast: the console says why at once, so the error is this one, never the boot timeout's
    with pytest.raises(SandboxError, match="the agent /opt/nowhere/mvm-agent is not an executable"):
        instance.start()
    assert instance.host_pids() == []


def test_qemu_dies_with_the_process_that_started_it(vm_template: TemplateImage, tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL (no cleanup at all) takes its VM with it."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from mvm.backends.base import NetworkPolicy, Resources, SandboxSpec
        from mvm.backends.vm import VmBackend
        from mvm.templates.image import TemplateImage
        template = TemplateImage(name={vm_template.name!r}, digest={vm_template.digest!r},
                                 directory=Path({str(vm_template.directory)!r}), suite={vm_template.suite!r},
                                 python_version={vm_template.python_version!r})
        spec = SandboxSpec("orphan", template, Resources(memory_mb=256), NetworkPolicy(), Path({str(tmp_path)!r}))
        instance = VmBackend().create(spec)
        instance.start()
        print(instance.host_pids()[0], flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        qemu_pid = int(child.stdout.readline())
        assert "qemu" in Path(f"/proc/{qemu_pid}/cmdline").read_text()
        assert os.getpgid(qemu_pid) == qemu_pid != os.getpgid(child.pid)  # its own process group
        child.send_signal(signal.SIGKILL)
        child.wait()
        wait_for(lambda: not Path(f"/proc/{qemu_pid}").exists(), "QEMU to die with its parent")
    finally:
        child.kill()
        VmBackend().cleanup_orphan(tmp_path)


def test_rootfs_smaller_than_the_template_is_refused(
    make_instance, tmp_path_factory: pytest.TempPathFactory  # type: ignore[no-untyped-def]
) -> None:
    root = tmp_path_factory.getbasetemp() / "vm"
    before = set(root.iterdir())
    with pytest.raises(InvalidArgument, match="rootfs_size_mb") as err:
        make_instance(rootfs_size_mb=32)
    assert err.value.field == "rootfs_size_mb"
    assert set(root.iterdir()) == before  # nothing half-created left behind


def test_console_log_stays_bounded(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * (CONSOLE_MAX + 10) + b"last line\n")
    trim_console(log)
    assert log.stat().st_size == 0
    kept = (tmp_path / "console.log.1").read_bytes()
    assert kept.endswith(b"last line\n") and len(kept) <= CONSOLE_MAX


def test_long_state_dir_puts_sockets_in_a_short_private_dir(
    vm_template: TemplateImage, tmp_path: Path
) -> None:
    from mvm.backends.base import NetworkPolicy, Resources, SandboxSpec

    state_dir = tmp_path / ("x" * 60) / ("y" * 40)
    spec = SandboxSpec("longpath01", vm_template, Resources(memory_mb=256), NetworkPolicy(), state_dir)
    instance = VmBackend().create(spec)
    try:
        assert instance.socket_dir == Path(f"/tmp/mvm-{os.getuid()}/longpath01")
        assert oct(instance.socket_dir.stat().st_mode & 0o777) == "0o700"
        agent = Agent(instance.start())
        assert agent.sh("echo ok") == "ok\n"
        record = json.loads((spec.backend_dir / "backend.json").read_text())
        assert record["socket_dir"] == str(instance.socket_dir)  # so cleanup_orphan finds it
        agent.close()
    finally:
        instance.destroy()
    assert not instance.socket_dir.exists()


def test_concurrent_first_creates_boot_once(make_instance) -> None:  # type: ignore[no-untyped-def]
    import concurrent.futures

    instances = [make_instance(ready=True, memory_mb=288) for _ in range(2)]
    ready.discard(ready.ready_key(instances[0]._ready_parts()))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        socks = list(pool.map(lambda i: i.start(), instances))
    assert sorted(i.describe()["boot"] for i in instances) == ["cold", "restored"]
    for sock, instance in zip(socks, instances, strict=True):
        agent = Agent(sock)
        assert agent.sh("echo up") == "up\n"
        agent.close()
        instance.destroy()
