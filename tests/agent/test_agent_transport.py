"""Finding the virtio-serial port (the VM backend tests drive the port itself in a real microVM)."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import pytest
from waiting import wait_for

from mvm.agent.transport import find_virtio_port


def _port(sys_root: Path, device: str, name: str, dev: str = "1:3") -> None:
    (sys_root / device).mkdir(parents=True)
    (sys_root / device / "name").write_text(name + "\n")
    (sys_root / device / "dev").write_text(dev + "\n")


def test_the_port_is_found_by_its_name(tmp_path: Path) -> None:
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir()
    _port(sys_root, "vport0p1", "console")
    _port(sys_root, "vport0p2", "agent")
    (dev_root / "vport0p1").touch()
    (dev_root / "vport0p2").touch()
    assert find_virtio_port("agent", str(sys_root), str(dev_root)) == str(dev_root / "vport0p2")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_missing_device_node_is_created_from_sysfs(tmp_path: Path) -> None:
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir()
    _port(sys_root, "vport1p1", "agent", dev="1:3")
    path = find_virtio_port("agent", str(sys_root), str(dev_root))
    info = os.stat(path)
    assert stat.S_ISCHR(info.st_mode) and (os.major(info.st_rdev), os.minor(info.st_rdev)) == (1, 3)


def test_the_agent_waits_for_a_port_that_appears_later(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    sys_root.mkdir()
    dev_root.mkdir()
    found: list[str] = []
    caplog.set_level(logging.WARNING, logger="mvm.agent")
    thread = threading.Thread(target=lambda: found.append(find_virtio_port("agent", str(sys_root), str(dev_root))),
                              daemon=True)
    thread.start()
    # It says it waits once it looked and found no port: from then on only a port can end the wait.
    wait_for(lambda: "waiting for the virtio-serial port named 'agent'" in caplog.text, "the agent to say it waits")
    assert thread.is_alive() and not found, "no port yet: keep waiting, never give up"
    (dev_root / "vport2p1").touch()
    _port(sys_root, "vport2p1", "agent")
    thread.join(30)
    assert found == [str(dev_root / "vport2p1")]
