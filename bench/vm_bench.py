"""microVM speed and density, as ratios against baselines measured in the same run.

    .venv/bin/python bench/vm_bench.py [--runs N] [--density N]

Rows:
  create -> first commands.run result: cold boot, restore from the ready snapshot,
      and the namespace backend, each against a bare qemu boot of the same
      kernel + initramfs to /init (the floor)
  commands.run(["true"]) round trip in the VM vs local subprocess.run(["true"])
  snapshot save and restore (sealed) per 100 MiB of guest memory image
  density: host memory (PSS) per idle 256 MiB sandbox, and how many fit
Targets (issue 3, TCG): restore -> first result <= 400 ms median and >= 6x faster
than a cold boot; on real KVM <= 150 ms (E2B's published create is ~150 ms,
Firecracker's boot target <= 125 ms).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mvm
from mvm.backends.vm.accel import probe_accelerator, probe_boot
from mvm.backends.vm.initramfs import ensure_initramfs
from mvm.backends.vm.kernel import ensure_kernel

TEMPLATE = "python-3.13"
MiB = 1024 * 1024


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def create_first_result(backend: str, memory_mb: int = 512) -> float:
    start = time.perf_counter()
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="10m", resources=mvm.resources(memory_mb=memory_mb)) as sb:
        sb.commands.run(["true"])
        elapsed = time.perf_counter() - start
    return elapsed


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--density", type=int, default=8)
    ns = parser.parse_args()
    accel = probe_accelerator()
    kernel = ensure_kernel()
    initrd = ensure_initramfs(kernel)
    print(f"accel={accel['accel']} ({accel['kvm_status']}) kernel={kernel.version} runs={ns.runs}")

    floor = []
    for _ in range(3):
        start = time.perf_counter()
        ok, seen = probe_boot(kernel, initrd, accel=accel["accel"])
        floor.append(time.perf_counter() - start)
        assert ok, seen
    create_first_result("vm")  # make sure the ready snapshot for 512 MiB exists
    # each cold sample uses a VM shape no ready snapshot exists for (includes saving one)
    stamp = int(time.time()) % 97
    cold = [create_first_result("vm", memory_mb=520 + 8 * ((stamp + i) % 40)) for i in range(ns.cold_runs)]
    restored = [create_first_result("vm") for _ in range(ns.runs)]
    create_first_result("namespace")
    namespace = [create_first_result("namespace") for _ in range(ns.runs)]

    print("| measurement | median | vs bare qemu boot to /init |")
    print("|---|---|---|")
    print(f"| bare qemu boot to /init (floor) | {ms(floor):.0f} ms | 1.00x |")
    print(f"| vm cold boot -> first result | {ms(cold):.0f} ms | {ms(cold) / ms(floor):.2f}x |")
    print(
        f"| vm restore from ready snapshot -> first result | {ms(restored):.0f} ms | {ms(restored) / ms(floor):.2f}x "
        f"(cold/restore = {ms(cold) / ms(restored):.1f}x) |"
    )
    print(f"| namespace create -> first result | {ms(namespace):.0f} ms | {ms(namespace) / ms(floor):.2f}x |")

    with mvm.Sandbox.create(TEMPLATE, backend="vm", ttl="10m") as sb:
        for _ in range(3):
            sb.commands.run(["true"])
        rt = []
        for _ in range(ns.runs * 5):
            start = time.perf_counter()
            sb.commands.run(["true"])
            rt.append(time.perf_counter() - start)
        local = []
        for _ in range(ns.runs * 5):
            start = time.perf_counter()
            subprocess.run(["true"], check=True)
            local.append(time.perf_counter() - start)
        print(
            f"| vm commands.run(['true']) round trip | {ms(rt):.1f} ms | local subprocess.run: {ms(local):.1f} ms "
            f"({ms(rt) / ms(local):.1f}x) |"
        )

        sb.commands.run(["sh", "-c", "head -c 200000000 /dev/urandom > /dev/shm/fill"])  # dirty ~190 MiB
        start = time.perf_counter()
        snap = sb.snapshot(name="bench", expires="1h")
        save = time.perf_counter() - start
        start = time.perf_counter()
        with mvm.Sandbox.create(TEMPLATE, backend="vm", ttl="10m", from_snapshot=snap.id) as clone:
            clone.commands.run(["true"])
            restore = time.perf_counter() - start
        per = snap.size_bytes / (100 * MiB)
        print(
            f"| snapshot save (sealed), {snap.size_bytes / MiB:.0f} MiB image | {save * 1000:.0f} ms | "
            f"{save * 1000 / per:.0f} ms per 100 MiB |"
        )
        print(
            f"| snapshot restore (verify+unseal+boot) -> first result | {restore * 1000:.0f} ms | "
            f"{restore * 1000 / per:.0f} ms per 100 MiB |"
        )

    boxes = []
    try:
        for _ in range(ns.density):
            boxes.append(mvm.Sandbox.create(TEMPLATE, backend="vm", ttl="10m", resources=mvm.resources(memory_mb=256)))
        time.sleep(2)
        pss = []
        for box in boxes:
            pids = box.describe().details.get("host_pids") or []
            pss.append(sum(pss_kib(p) for p in pids) / 1024)
        available = (
            next(
                int(line.split()[1])
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemAvailable:")
            )
            / 1024
        )
        each = statistics.median(pss)
        print(
            f"| density: idle 256 MiB VM, host PSS each | {each:.0f} MiB | {len(boxes)} running; "
            f"~{int(available / each) + len(boxes)} would fit in this host's memory |"
        )
    finally:
        for box in boxes:
            box.kill()


if __name__ == "__main__":
    main()
