"""start/stop/destroy, snapshots, orphan cleanup; nothing is left behind and the template
is never written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from waiting import wait_for
from nshelpers import Guest

from mvm.backends.base import NetworkPolicy, SandboxSpec
from mvm.backends.namespace import NamespaceBackend, cleanup_orphan, diskimage
from mvm.errors import InvalidArgument, InvalidNetworkPolicy, InvalidState
from mvm.osutil import pid_alive


def fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry of a tree with its type, size, mode, owner and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_mtime_ns)
    return out


def traces(inst) -> dict[str, object]:
    """Everything a sandbox may leave on the host."""
    mounts = Path("/proc/self/mountinfo").read_text()
    return {
        "mounts": [m for m in inst.layer.mounts() if f" {m} " in mounts],
        "cgroup_dirs": [str(d) for d in inst.cgroup.dirs() if d.exists()],
        "backend_dir": inst.spec.backend_dir.exists(),
        "run_dir": getattr(inst.layer, "run_dir", Path("/nonexistent")).exists(),
    }


def wait_loop_devices_gone(directory: Path) -> None:
    """A disk's loop device detaches itself once its file system's last user goes: that is
    our unmount, or a moment later when a mount namespace being set up meanwhile (another
    sandbox's bwrap copies every host mount until it pivots) lets go of its copy."""
    wait_for(lambda: diskimage.backed_by(directory) == [], f"the loop devices of {directory} to detach", timeout=30)


@pytest.fixture(scope="module")
def template_fingerprint(template):
    before = fingerprint(template.rootfs)
    yield
    assert fingerprint(template.rootfs) == before, "the template was modified"


def test_stop_keeps_files_and_start_sees_them(sandbox, template_fingerprint):
    inst, guest = sandbox()
    assert guest.sh("echo kept > /root/file && rm /etc/hostname && echo ok").out.strip() == "ok"
    pids = inst.host_pids()
    assert pids
    inst.stop()
    assert not any(pid_alive(p) for p in pids)
    assert inst.host_pids() == []
    assert all(Path(m) for m in inst.layer.mounts())
    guest2 = Guest(inst.start())
    res = guest2.sh("cat /root/file; test -e /etc/hostname && echo present || echo gone")
    assert res.out.split() == ["kept", "gone"]


def test_destroy_leaves_nothing(sandbox, template_fingerprint):
    inst, guest = sandbox()
    guest.sh("echo x > /tmp/x")
    pids = inst.host_pids()
    record = json.loads((inst.spec.backend_dir / "backend.json").read_text())
    assert record["bwrap_pid"] in pids
    assert record["mounts"] and record["cgroup"]["dirs"]
    assert len(diskimage.backed_by(inst.spec.backend_dir)) == 1  # the sandbox's disk
    inst.destroy()
    assert traces(inst) == {"mounts": [], "cgroup_dirs": [], "backend_dir": False, "run_dir": False}
    wait_loop_devices_gone(inst.spec.backend_dir)
    assert not any(pid_alive(p) for p in pids)
    with pytest.raises(InvalidState):
        inst.start()
    inst.destroy()  # idempotent


def test_state_errors(sandbox):
    inst, _guest = sandbox()
    with pytest.raises(InvalidState):
        inst.start()
    inst.stop()
    with pytest.raises(InvalidState):
        inst.pause()


def test_snapshot_and_restore_files_only(sandbox, backend, make_spec, tmp_path, template_fingerprint):
    inst, guest = sandbox()
    script = textwrap.dedent(
        """
        set -e
        mkdir -p /app/data && echo hello > /app/data/greeting
        ln -s /app/data/greeting /app/link
        ln /app/data/greeting /app/hard
        rm /etc/hostname                      # a whiteout over a template file
        rm -rf /etc/apt && mkdir /etc/apt && echo new > /etc/apt/only   # an opaque directory
        chmod 700 /app/data
        echo ok
        """
    )
    assert guest.sh(script).out.strip() == "ok"
    dest = tmp_path / "snap"
    artifacts = inst.snapshot(dest)
    assert artifacts.kind == "filesystem"
    assert artifacts.details["memory"] is False and artifacts.details["processes"] is False
    assert (dest / artifacts.files[0]).stat().st_mode & 0o777 == 0o600
    # the sandbox keeps running after a snapshot
    assert guest.py("print('alive')").out.strip() == "alive"

    # restore into another sandbox (another id, so another host uid range)
    other = backend.create(make_spec("restored-one"))
    try:
        g2 = Guest(other.restore(dest, artifacts))
        res = g2.sh(
            "cat /app/data/greeting; readlink /app/link; cat /app/hard; "
            "test -e /etc/hostname && echo host-present || echo host-gone; ls /etc/apt; "
            "stat -c '%u %a' /app/data; stat -c %h /app/hard"
        )
        assert res.out.split() == ["hello", "/app/data/greeting", "hello", "host-gone", "only", "0", "700", "2"], res
        assert other.describe()["uid_map"]["host_uid"] != inst.describe()["uid_map"]["host_uid"]
    finally:
        other.destroy()


def test_restore_refuses_wrong_artifacts(sandbox, tmp_path):
    from mvm.backends.base import SnapshotArtifacts

    inst, _ = sandbox()
    with pytest.raises(InvalidArgument) as err:
        inst.restore(tmp_path, SnapshotArtifacts(kind="full", files=()))
    assert err.value.field == "artifacts.kind"


def test_cleanup_orphan_after_everything_was_killed(template, state_root, template_fingerprint):
    """A supervisor (here: a child process) is SIGKILLed: --die-with-parent takes the
    sandbox down with it, and cleanup_orphan removes the mounts and cgroups it left."""
    state_dir = state_root / "orphan"
    code = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from mvm.backends.base import NetworkPolicy, Resources, SandboxSpec
        from mvm.backends.namespace import NamespaceBackend
        from mvm.templates.image import TemplateImage
        t = TemplateImage({template.name!r}, {template.digest!r}, Path({str(template.directory)!r}),
                          {template.suite!r}, {template.python_version!r})
        spec = SandboxSpec("orphan", t, Resources(), NetworkPolicy(), Path({str(state_dir)!r}))
        inst = NamespaceBackend().create(spec)
        sock = inst.start()
        sock.settimeout(30)
        sock.recv(1, __import__("socket").MSG_PEEK)
        print(json.dumps(inst.host_pids()), flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = json.loads(proc.stdout.readline())
    assert pids
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not any(pid_alive(p) for p in pids), "the sandbox to end with its supervisor", timeout=10)
    record = json.loads((state_dir / "backend" / "backend.json").read_text())
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert all(f" {m} " in mountinfo for m in record["mounts"])  # left behind, for now
    assert len(diskimage.backed_by(state_dir / "backend")) == 1  # with the disk's loop device
    cleanup_orphan(state_dir)
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert not any(f" {m} " in mountinfo for m in record["mounts"])
    wait_loop_devices_gone(state_dir / "backend")
    assert not any(Path(d).exists() for d in record["cgroup"]["dirs"])
    assert not Path(record["run_dir"]).exists()
    assert not (state_dir / "backend").exists()
    NamespaceBackend().cleanup_orphan(state_dir)  # idempotent


def test_cleanup_orphan_kills_live_processes(backend, make_spec):
    """The supervisor vanished without destroy but the sandbox still runs."""
    spec = make_spec()
    inst = backend.create(spec)
    guest = Guest(inst.start())
    guest.sh("echo hi")
    pids = inst.host_pids()
    record = json.loads((spec.backend_dir / "backend.json").read_text())
    backend.cleanup_orphan(spec.state_dir)
    assert not any(pid_alive(p) for p in pids)
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert not any(f" {m} " in mountinfo for m in record["mounts"])
    wait_loop_devices_gone(spec.backend_dir)
    assert not any(Path(d).exists() for d in record["cgroup"]["dirs"])
    backend.cleanup_orphan(spec.state_dir)


def test_cleanup_orphan_of_nothing(tmp_path):
    cleanup_orphan(tmp_path / "never-existed")
    (tmp_path / "empty" / "backend").mkdir(parents=True)
    cleanup_orphan(tmp_path / "empty")
    assert not (tmp_path / "empty" / "backend").exists()


def test_invalid_input_names_the_field(backend, make_spec, template, state_root):
    from dataclasses import replace

    with pytest.raises(InvalidArgument) as err:
        backend.create(make_spec("../evil"))
    assert err.value.field == "sandbox_id"
    with pytest.raises(InvalidArgument) as err:
        backend.create(make_spec(memory_mb=4))
    assert err.value.field == "resources.memory_mb"
    with pytest.raises(InvalidArgument) as err:
        backend.create(make_spec(cpu_cores=0))
    assert err.value.field == "resources.cpu_cores"
    with pytest.raises(InvalidArgument) as err:
        backend.create(make_spec(max_processes=2))
    assert err.value.field == "resources.max_processes"
    with pytest.raises(InvalidNetworkPolicy) as err:
        backend.create(replace(make_spec(), network=NetworkPolicy(mode="wide-open")))  # type: ignore[arg-type]
    assert err.value.field == "network.mode"
    spec = make_spec()
    bad_template = replace(spec.template, directory=state_root / "missing")
    with pytest.raises(InvalidArgument) as err:
        backend.create(SandboxSpec(spec.sandbox_id, bad_template, spec.resources, spec.network, spec.state_dir))
    assert err.value.field == "template"
    assert list(state_root.iterdir()) == []  # nothing half-created


def test_availability_reports_the_setup(backend):
    available = backend.availability()
    assert available.ok, available.reason
    assert available.details["root"] == "overlay-image"  # root, loop devices
    assert "ext4 image" in available.details["disk"]  # what mvmctl doctor shows
    assert available.details["cgroup"] in ("v1", "v2")
    assert available.details["uid_map"] == "idmapped"
    assert "bubblewrap" in available.details["bwrap"]


def test_copy_root_mode_works(make_spec, template_fingerprint):
    """The fallback for hosts without root overlays: a private copy of the template. It has
    no size limit, and describe() says so: 80 MiB go into a sandbox of rootfs_size_mb 64."""
    inst = NamespaceBackend(root_mode="copy", uid_mode="host-root").create(make_spec(rootfs_size_mb=64))
    try:
        guest = Guest(inst.start())
        assert guest.sh("echo hi > /root/x && cat /root/x").out.strip() == "hi"
        assert guest.sh("head -c 80M /dev/zero > /root/big; echo $?; stat -c %s /root/big").out.split() == [
            "0", str(80 << 20)]
        assert inst.describe()["root"] == "copy"
        assert inst.describe()["uid_map"]["mode"] == "host-root"
        assert any("host root" in note for note in inst.describe()["notes"])
        assert any("rootfs_size_mb is NOT enforced" in note for note in inst.describe()["notes"])
    finally:
        inst.destroy()
    assert not inst.spec.backend_dir.exists()


def test_without_idmapped_mounts_root_is_host_root_and_says_so(backend, make_spec, monkeypatch):
    """A template on a file system that refuses idmapped mounts: the sandbox still runs,
    as host uid 0 with no capabilities, and describe() states the trade-off."""
    from mvm.backends.namespace import overlay

    def refuse(source, target, userns_fd):
        raise overlay.IdmapUnsupported(22, "mount_setattr(MOUNT_ATTR_IDMAP): Invalid argument")

    monkeypatch.setattr(overlay, "idmapped_bind", refuse)
    inst = backend.create(make_spec())
    try:
        guest = Guest(inst.start())
        assert guest.sh("id -u; grep CapEff /proc/self/status").out.split() == ["0", "CapEff:", "0000000000000000"]
        desc = inst.describe()
        assert desc["uid_map"]["mode"] == "host-root"
        assert any("host root" in note for note in desc["notes"])
        for pid in inst.host_pids():
            assert Path(f"/proc/{pid}/status").read_text().count("Uid:\t0\t0\t0\t0") == 1
    finally:
        inst.destroy()
    assert not inst.spec.backend_dir.exists()


def test_a_sandbox_that_cannot_start_says_why(backend, make_spec):
    from dataclasses import dataclass

    from mvm.errors import SandboxError
    from mvm.templates.image import TemplateImage

    @dataclass(frozen=True)
    class Broken(TemplateImage):
        @property
        def agent_command(self) -> list[str]:
            return ["/nonexistent/agent"]

    spec = make_spec()
    t = spec.template
    broken = Broken(t.name, t.digest, t.directory, t.suite, t.python_version)
    inst = backend.create(SandboxSpec(spec.sandbox_id, broken, spec.resources, spec.network, spec.state_dir))
    with pytest.raises(SandboxError, match="/nonexistent/agent"):
        inst.start()
    assert inst.host_pids() == []
    inst.destroy()
    assert not spec.backend_dir.exists()


def test_guest_output_to_the_host_log_is_bounded(tmp_path):
    """What the agent (and bwrap) print lands in bwrap.log through a pipe, capped."""
    import threading

    from mvm.backends.namespace.backend import LOG_CAP, _LogDrain

    r, w = os.pipe()
    log = tmp_path / "bwrap.log"
    drain = _LogDrain(r, log)
    drain.start()

    def flood():
        with os.fdopen(w, "wb") as out:
            for _ in range(3 * LOG_CAP // 65536):
                out.write(b"x" * 65536)

    writer = threading.Thread(target=flood)
    writer.start()
    writer.join(timeout=30)
    drain.join(timeout=30)
    assert not writer.is_alive() and not drain.is_alive()  # the writer is never blocked
    assert LOG_CAP <= log.stat().st_size < LOG_CAP + 4096
    assert log.read_bytes().endswith(b"discarded]\n")


def test_a_disk_is_shut_down_only_through_its_own_image(tmp_path):
    """The no-writeback shutdown before a disk's deletion acts on the loop device of the
    image it is given and nothing else (not another disk, not the file system around it)."""
    from mvm.backends.namespace import overlay

    images, mounts = [tmp_path / "a.ext4", tmp_path / "b.ext4"], [tmp_path / "a", tmp_path / "b"]
    for image, mount_point in zip(images, mounts, strict=True):
        diskimage.make_image(image, 64)
        mount_point.mkdir()
        device, path = diskimage.attach(image)
        try:
            overlay.mount(path, mount_point, "ext4")
        finally:
            os.close(device)
    try:
        diskimage.shut_down(mounts[0], images[1])  # the wrong image: refused
        diskimage.shut_down(tmp_path, images[0])  # not a disk at all: refused
        (mounts[0] / "still-writable").write_text("yes")
        (tmp_path / "host-writable").write_text("yes")
        diskimage.shut_down(mounts[0], images[0])
        with pytest.raises(OSError):
            (mounts[0] / "after-shutdown").write_text("no")
        (mounts[1] / "the-other-disk").write_text("yes")
    finally:
        for mount_point in mounts:
            overlay.unmount(mount_point)
    wait_loop_devices_gone(tmp_path)  # the loop devices go with their mounts


def test_tmpfs_root_mode_works(make_spec, template_fingerprint):
    """The fallback for hosts with root but no loop devices: the upper layer on a tmpfs,
    still bounded by rootfs_size_mb, and describe() says it is memory."""
    inst = NamespaceBackend(root_mode="overlay-tmpfs").create(make_spec(rootfs_size_mb=1024))
    try:
        guest = Guest(inst.start())
        res = guest.sh("echo hi > /root/x && head -c 20M /dev/zero > /root/big; echo $?; cat /root/x")
        assert res.out.split() == ["0", "hi"]
        assert inst.describe()["root"] == "overlay-tmpfs"
        assert inst.describe()["limits"]["rootfs_size_mb"] == 1024
        assert any("tmpfs" in note and "out-of-memory" in note for note in inst.describe()["notes"])
        assert diskimage.backed_by(inst.spec.backend_dir) == []
    finally:
        inst.destroy()
    assert not inst.spec.backend_dir.exists()


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="fuse-overlayfs is not installed")
def test_fuse_overlay_root_mode_works(make_spec, template_fingerprint):
    """The fallback for hosts where mvm runs without root but has fuse-overlayfs."""
    inst = NamespaceBackend(root_mode="fuse-overlayfs", uid_mode="host-root").create(make_spec())
    try:
        guest = Guest(inst.start())
        assert guest.sh("echo hi > /root/x && rm /etc/hostname && cat /root/x").out.strip() == "hi"
        assert (inst.layer.upper / "root" / "x").read_text() == "hi\n"
        inst.stop()
        guest = Guest(inst.start())
        assert guest.sh("cat /root/x; test -e /etc/hostname || echo gone").out.split() == ["hi", "gone"]
        assert inst.describe()["root"] == "fuse-overlayfs"
    finally:
        inst.destroy()
    assert not inst.spec.backend_dir.exists()
