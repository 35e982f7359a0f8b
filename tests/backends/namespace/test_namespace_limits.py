"""Each limit bites: memory (OOM kill), processes (fork bomb), cpu (quota), rootfs (ENOSPC),
and pause really freezes."""

from __future__ import annotations

import time

from waiting import wait_for


def test_memory_limit_oom_kills(sandbox):
    inst, guest = sandbox(memory_mb=64)
    res = guest.py("b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('allocated')")
    assert "allocated" not in res.out
    assert res.signal == 9 or res.exit_code in (-9, 137), res
    assert inst.cgroup.oom_kills() >= 1
    # the sandbox itself survives an OOM of one of its processes
    assert guest.py("print('alive')").out.strip() == "alive"


def test_memory_below_the_limit_works(sandbox):
    _, guest = sandbox(memory_mb=128)
    res = guest.py("b = bytearray(40 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('allocated')")
    assert res.out.strip() == "allocated", res


def test_fork_bomb_stops_at_the_pids_limit(sandbox):
    inst, guest = sandbox(max_processes=40)
    res = guest.py(
        "import os, signal, time\n"
        "children, error = 0, None\n"
        "for _ in range(400):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as exc:\n"
        "        error = exc.errno; break\n"
        "    if pid == 0:\n"
        "        time.sleep(60); os._exit(0)\n"
        "    children += 1\n"
        "print(children, error, flush=True)\n"
        "os.killpg(0, signal.SIGKILL)\n"
    )
    children, error = res.out.split()
    assert error == "11"  # EAGAIN from the pids controller
    assert 0 < int(children) < 40
    # the host is fine and so is the sandbox once the bomb is gone
    assert guest.py("print('alive')").out.strip() == "alive"
    assert len(inst.host_pids()) < 10


def test_cpu_quota_limits_usage(sandbox):
    inst, guest = sandbox(cpu_cores=0.5)
    busy = (
        "import multiprocessing as mp, time\n"
        "def spin(t):\n"
        "    end = time.monotonic() + t\n"
        "    while time.monotonic() < end: pass\n"
        "if __name__ == '__main__':\n"
        "    ps = [mp.Process(target=spin, args=(2.0,)) for _ in range(2)]\n"
        "    [p.start() for p in ps]; [p.join() for p in ps]\n"
    )
    before = inst.usage()["cpu_ns"]
    t0 = time.monotonic()
    res = guest.py(busy, timeout=120)
    wall = time.monotonic() - t0
    used = (inst.usage()["cpu_ns"] - before) / 1e9
    assert res.exit_code == 0, res.err
    # two spinning processes would use ~2 cores without the quota; 0.5 core allowed
    assert used / wall < 0.8, (used, wall)
    assert used > 0.2, (used, wall)


def test_rootfs_size_limit_gives_enospc(sandbox, template):
    _inst, guest = sandbox(rootfs_size_mb=16)
    res = guest.py(
        "import errno\n"
        "try:\n"
        "    with open('/var/big', 'wb') as f:\n"
        "        for _ in range(64): f.write(b'x' * (1 << 20))\n"
        "    print('wrote-all')\n"
        "except OSError as e:\n"
        "    print('error', e.errno == errno.ENOSPC)\n"
    )
    assert res.out.strip() == "error True", res
    assert not (template.rootfs / "var" / "big").exists()


def test_a_disk_bigger_than_memory_fills_to_enospc_without_an_oom_kill(sandbox):
    """The disk is not memory: 192 MiB of files in a sandbox of 64 MiB memory end in ENOSPC
    at the disk's size; nothing is out-of-memory killed, the memory limit still holds."""
    inst, guest = sandbox(memory_mb=64, rootfs_size_mb=192)
    agent = guest.sh("echo $PPID").out
    res = guest.sh("cat /dev/zero > /var/fill; echo status $?; stat -c %s /var/fill")
    assert "No space left on device" in res.err, res
    status, filled = res.out.split("\n")[:2]
    assert status == "status 1" and 0.9 * 192 * 2**20 < int(filled) <= 192 * 2**20
    assert inst.cgroup.oom_kills() == 0
    assert guest.sh("echo $PPID").out == agent  # the same agent answers
    res = guest.py("b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('allocated')")
    assert res.signal == 9 or res.exit_code in (-9, 137), res  # memory_mb still bites
    assert guest.sh("rm /var/fill && echo room > /var/after && cat /var/after").out == "room\n"


def test_pause_freezes_and_resume_continues(sandbox):
    inst, guest = sandbox()
    guest.request(
        "proc.start",
        {
            "argv": [
                "/usr/bin/python3",
                "-c",
                "import time\n"
                "n = 0\n"
                "while True:\n"
                "    n += 1\n"
                "    open('/tmp/counter.tmp', 'w').write(str(n))\n"
                "    __import__('os').replace('/tmp/counter.tmp', '/tmp/counter')\n"
                "    time.sleep(0.01)\n",
            ],
            "env": {},
            "cwd": "/",
            "stdin": False,
        },
    )
    counter = inst.layer.upper / "tmp" / "counter"
    wait_for(counter.exists, "the counter to start")

    def value() -> int:
        return int(counter.read_text())

    started = value()
    wait_for(lambda: value() > started, "the counter counting")
    inst.pause()
    assert inst.describe()["state"] == "paused"
    frozen = value()
    time.sleep(0.4)  # the pause itself: ~40 ticks if it did not hold
    assert value() == frozen
    inst.resume()
    wait_for(lambda: value() > frozen + 5, "the counter counting again after resume")
    assert guest.py("print('alive')").out.strip() == "alive"


def test_pause_freezes_processes_that_keep_forking(sandbox):
    """Processes that fork all the time (shell loops running a program) can hold a v1
    freezer in FREEZING: asked once, it never reached FROZEN here and left the sandbox
    half-frozen (its agent stopped, its state running). Every pause freezes them all,
    and every resume lets them go on."""
    inst, guest = sandbox()
    for name in ("a", "b"):
        guest.request("proc.start", {
            "argv": ["/bin/sh", "-c", f"n=0; while :; do n=$((n+1)); echo $n > /tmp/{name}.new; "
                     f"/bin/mv /tmp/{name}.new /tmp/forks-{name}; done"],  # (a program each round: a fork)
            "env": {}, "cwd": "/", "stdin": False,
        })
    counter = inst.layer.upper / "tmp" / "forks-a"

    def forks() -> int:
        return int(counter.read_text())

    wait_for(counter.exists, "the forking loop to start")
    for _ in range(10):
        before = forks()
        wait_for(lambda before=before: forks() > before + 20, "the loop forking")
        inst.pause()
        assert inst.describe()["state"] == "paused"
        assert inst.cgroup.is_frozen()
        frozen = forks()
        time.sleep(0.1)
        assert forks() == frozen
        inst.resume()
    wait_for(lambda: forks() > frozen + 20, "the loop forking again after resume")
    assert guest.py("print('alive')").out.strip() == "alive"
