"""Pieces of the namespace backend that need no sandbox: cgroup v2 file layout (on a
fake tree: this host is v1), the upper-layer archive, the bwrap command line, the words of
a failed availability probe."""

from __future__ import annotations

import io
import os
import shlex
import signal
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from mvm.backends.namespace import bwrap, cgroups, layer
from mvm.backends.namespace.backend import _probe_root, probe_failure_reason
from mvm.osutil import exit_description


def _fake_v2(tmp_path: Path) -> tuple[Path, Path]:
    own = tmp_path / "own"
    child = own / "mvm-x"
    child.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text("")
    for name in ("memory.max", "memory.swap.max", "cpu.max", "pids.max", "cgroup.freeze", "cgroup.procs"):
        (child / name).write_text("")
    (child / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    (child / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\n")
    (child / "memory.current").write_text("4096\n")
    (child / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    return own, child


def test_cgroup_v2_writes_the_limits(tmp_path):
    own, child = _fake_v2(tmp_path)
    cg = cgroups.CgroupV2.for_sandbox("mvm-x", own_dir=own)
    cg.create(cpu_cores=0.5, memory_mb=64, max_processes=100)
    assert (own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (child / "memory.max").read_text() == str(64 * 1024 * 1024)
    assert (child / "memory.swap.max").read_text() == "0"
    assert (child / "cpu.max").read_text() == "50000 100000"
    assert (child / "pids.max").read_text() == "100"
    assert cg.procs_files() == [str(child / "cgroup.procs")]
    cg.freeze()
    assert (child / "cgroup.freeze").read_text() == "1"
    assert cg.is_frozen()
    cg.thaw()
    assert (child / "cgroup.freeze").read_text() == "0"
    assert cg.cpu_usage_ns() == 1_500_000
    assert cg.memory_bytes() == 4096
    assert cg.oom_kills() == 1
    again = cgroups.from_record(cg.record())
    assert isinstance(again, cgroups.CgroupV2) and again.dirs() == [child]


def test_cgroup_v2_refuses_without_delegated_controllers(tmp_path):
    own, _ = _fake_v2(tmp_path)
    (own / "cgroup.controllers").write_text("cpu io\n")
    cg = cgroups.CgroupV2.for_sandbox("mvm-x", own_dir=own)
    with pytest.raises(cgroups.BackendUnavailable, match="memory"):
        cg.create(1, 64, 100)


def test_cgroup_v1_record_round_trip():
    cg = cgroups.CgroupV1({"memory": Path("/m/mvm-x"), "cpu": Path("/c/mvm-x"), "freezer": Path("/f/mvm-x")})
    again = cgroups.from_record(cg.record())
    assert isinstance(again, cgroups.CgroupV1)
    assert again.controller_dirs["freezer"] == Path("/f/mvm-x")
    assert set(again.dirs()) == {Path("/m/mvm-x"), Path("/c/mvm-x"), Path("/f/mvm-x")}


def test_cgroup_detection_matches_this_host():
    version = cgroups.detect_version()
    assert version == ("v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1")


def _build_upper(root: Path, base: int) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"content")
    (root / "dir" / "file").chmod(0o640)
    os.link(root / "dir" / "file", root / "hard")
    os.symlink("/dir/file", root / "link")
    os.mknod(root / "whiteout", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(root / "dir" / "sub", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "dir" / "file", "user.binary", bytes(range(256)))
    for path in (root, root / "dir", root / "dir" / "sub", root / "dir" / "file"):
        os.chown(path, base + 7, base + 8)
    os.lchown(root / "link", base, base)


def test_layer_round_trip_keeps_overlay_metadata_and_shifts_owners(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _build_upper(src, 100000)
    buf = io.BytesIO()
    assert layer.pack(src, buf, uid_base=100000, uid_count=65536) == 7
    buf.seek(0)
    layer.unpack(buf, dst, uid_base=300000)
    assert (dst / "dir" / "file").read_bytes() == b"content"
    assert stat.S_IMODE((dst / "dir" / "file").stat().st_mode) == 0o640
    assert (dst / "dir" / "file").stat().st_uid == 300007
    assert (dst / "dir" / "file").stat().st_gid == 300008
    assert (dst / "hard").stat().st_ino == (dst / "dir" / "file").stat().st_ino
    assert os.readlink(dst / "link") == "/dir/file"
    assert os.lstat(dst / "link").st_uid == 300000
    wh = os.lstat(dst / "whiteout")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dst / "dir" / "sub", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(dst / "dir" / "file", "user.binary") == bytes(range(256))


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    buf.seek(0)
    return buf


def test_layer_unpack_never_leaves_the_destination(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    link = tarfile.TarInfo("escape")
    link.type = tarfile.SYMTYPE
    link.linkname = str(outside)
    evil = tarfile.TarInfo("escape/evil")
    evil.size = 4
    with pytest.raises(OSError):
        layer.unpack(_tar([(link, b""), (evil, b"evil")]), dst)
    assert not (outside / "evil").exists()

    dst2 = tmp_path / "dst2"
    dst2.mkdir()
    dotdot = tarfile.TarInfo("../evil")
    dotdot.size = 4
    with pytest.raises(ValueError):
        layer.unpack(_tar([(dotdot, b"evil")]), dst2)
    assert not (tmp_path / "evil").exists()


def test_bwrap_command_line():
    cfg = bwrap.BwrapConfig(
        root_fd=None,
        root_path="/run/mvm/ns/x/merged",
        userns_fd=11,
        seccomp_fd=12,
        info_fd=13,
        command=["/usr/bin/python3", "-I", "/opt/mvm/bin/mvm-agent", "--fd", "3"],
    )
    argv = bwrap.build_argv(cfg)
    joined = " ".join(argv)
    for flag in (
        "--userns 11 --uid 0 --gid 0",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname sandbox",
        "--bind /run/mvm/ns/x/merged /",
        "--proc /proc",
        "--dev /dev",
        "--cap-drop ALL",
        "--seccomp 12",
        "--info-fd 13",
    ):
        assert flag in joined, flag
    assert argv[-6:] == ["--", "/usr/bin/python3", "-I", "/opt/mvm/bin/mvm-agent", "--fd", "3"]
    no_userns = bwrap.build_argv(bwrap.BwrapConfig(None, "/r", None, 5, 6, ["x"]))
    assert "--unshare-user" in no_userns and "--disable-userns" in no_userns


def test_a_killed_probe_bwrap_is_reported_in_words():
    # a real bwrap with the probe's root, killed from outside as the OOM killer would
    # while it runs (--die-with-parent: what it started goes with it)
    argv = [str(bwrap.bwrap_path()), "--unshare-all", "--die-with-parent", *_probe_root(),
            "sh", "-c", "echo running; exec sleep 60"]
    probe = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert probe.stdout is not None and probe.stdout.readline() == "running\n"
    probe.send_signal(signal.SIGKILL)
    _, stderr = probe.communicate(timeout=30)
    assert probe.returncode == -signal.SIGKILL
    assert exit_description(probe.returncode) == "was killed by SIGKILL"
    reason = probe_failure_reason(argv, probe.returncode, stderr)
    assert reason.startswith("the probe bwrap was killed by SIGKILL before it could answer")
    assert "-9" not in reason and "see dmesg" in reason and reason.endswith(shlex.join(argv))


def test_a_failed_probe_keeps_what_bwrap_said_and_otherwise_its_exit_status():
    argv = [str(bwrap.bwrap_path()), "--no-such-option", "true"]
    probe = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert probe.returncode == 1 and probe.stderr.strip()
    assert probe_failure_reason(argv, probe.returncode, probe.stderr) == (
        f"bwrap cannot create namespaces here: {probe.stderr.strip()}")
    quiet = subprocess.run(["sh", "-c", "exit 3"], timeout=30)
    assert exit_description(quiet.returncode) == "exited with status 3"
    assert "the probe bwrap exited with status 3 and printed nothing" in probe_failure_reason(
        argv, quiet.returncode, "")


def test_a_probe_killed_from_outside_is_answered_not_kept(tmp_path, monkeypatch):
    """A probe bwrap killed from outside (the OOM killer, a user) says nothing about
    namespaces: availability() reports it but keeps no verdict, so the same process's next
    call probes again and gets the real answer, which is then kept."""
    import importlib

    ns = importlib.import_module("mvm.backends.namespace.backend")  # (the package's `backend` is the instance)
    real = str(bwrap.bwrap_path())
    marker = tmp_path / "killed-once"
    calls = tmp_path / "calls"
    wrapper = tmp_path / "bwrap"  # the real bwrap, but killed by SIGKILL the first time it runs
    wrapper.write_text(f"#!/bin/sh\necho run >> {calls}\n"
                       f"if [ ! -e {marker} ]; then touch {marker}; kill -KILL $$; fi\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(ns.bw, "bwrap_path", lambda: str(wrapper))
    monkeypatch.setattr(ns.bw, "bwrap_version", lambda binary: "test")
    probed = ns.NamespaceBackend()
    first = probed.availability()
    assert not first.ok and first.reason.startswith("the probe bwrap was killed by SIGKILL")
    second = probed.availability()
    assert second.ok, second.reason
    assert probed.availability() is second and calls.read_text().count("run") == 2  # kept now: no third probe


class _StuckFreezer(cgroups.CgroupV1):
    """A v1 freezer (on a fake tree) that stays FREEZING however often it is asked."""

    asked = 0

    def _ask_frozen(self) -> None:
        self.asked += 1
        (self.controller_dirs["freezer"] / "freezer.state").write_text("FREEZING\n")


def test_a_freeze_that_does_not_complete_is_undone_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "FREEZE_TRIES_BEFORE_SETTLING", 3)
    freezer = tmp_path / "freezer" / "mvm-x"
    freezer.mkdir(parents=True)
    (freezer / "freezer.state").write_text("THAWED\n")
    cg = _StuckFreezer({"freezer": freezer})
    with pytest.raises(cgroups.SandboxError, match=r"did not all freeze within 0\.2 s .*thawed and runs on") as caught:
        cg.freeze(timeout=0.2)
    assert caught.value.details["timeout_seconds"] == 0.2
    assert (freezer / "freezer.state").read_text() == "THAWED"  # never left half-frozen
    assert not cg.is_frozen()
    assert cg.asked > 3  # asked again and again, with a thaw to settle between rounds


def test_a_v2_freeze_waits_without_thawing_and_is_undone_when_it_does_not_complete(tmp_path):
    own, child = _fake_v2(tmp_path)
    (child / "cgroup.events").write_text("populated 1\nfrozen 0\n")  # a task that never gets there
    thaws = []

    class Counted(cgroups.CgroupV2):
        def thaw(self) -> None:
            thaws.append((child / "cgroup.freeze").read_text())
            super().thaw()

    cg = Counted.for_sandbox("mvm-x", own_dir=own)
    with pytest.raises(cgroups.SandboxError, match="did not all freeze"):
        cg.freeze(timeout=0.3)  # (> FREEZE_TRIES_BEFORE_SETTLING tries of 2 ms)
    assert thaws == ["1"]  # once, at the end: v2 takes new processes in itself, a thaw would undo progress
    assert (child / "cgroup.freeze").read_text() == "0"
