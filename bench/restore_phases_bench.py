"""Where a VM (TCG) restore from the ready snapshot spends its time, phase by phase, and an
A/B against another checkout in the same run.

    .venv/bin/python bench/restore_phases_bench.py [--rounds 3] [--per-process 2] [--other /path/to/checkout]

Each measurement is one fresh process (so both variants pay the same imports) that creates
a VM instance on the backend, restores the ready snapshot (``start()``), says hello to the
agent, sends ``agent.configure`` as the supervisor does (clock, entropy, hostname and the
limits the agent enforces itself: ``max_processes``) and runs ``true`` twice; it prints
the milliseconds of each phase and how many blocks of guest code QEMU translated. With
``--other`` the same runs alternate with a checkout of other code (its ``src``), and the
medians are printed side by side. Runs in a throw-away
MVM_HOME (templates and caches shared with ~/.mvm); exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("overlay", "qemu_launch", "incoming", "cont_connect", "agent_hello", "agent_configure", "first_true",
          "second_true", "to_first_result", "qemu_cpu", "guest_blocks")


def measure(runs: int) -> list[dict[str, float]]:
    """Runs in the child process: ``runs`` measured restores after one warm-up."""
    import itertools
    import secrets
    import time

    from mvm.backends.base import NetworkPolicy, Resources, SandboxSpec
    from mvm.backends.vm import backend as vm_backend
    from mvm.backends.vm import machine
    from mvm.protocol import codec
    from mvm.protocol.channel import FramedChannel
    from mvm.templates import ensure_template

    marks: dict[str, float] = {}

    def wrap(owner: object, name: str, before: str | None, after: str) -> None:
        real = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            if before:
                marks.setdefault(before, time.perf_counter())
            result = real(*args, **kwargs)
            marks.setdefault(after, time.perf_counter())
            return result

        setattr(owner, name, timed)

    wrap(machine.QemuMachine, "launch", "overlay", "qemu_launch")
    wrap(vm_backend, "await_incoming", None, "incoming")
    template = ensure_template("python-3.13")
    ids = itertools.count(1)

    def call(channel: FramedChannel, op: str, args: dict[str, object]) -> dict[str, object]:
        ident = next(ids)
        channel.send_raw(codec.request(ident, op, args))
        while True:
            header = channel.recv().header
            if header["kind"] == "response" and header["id"] == ident:
                return dict(header)

    def run_true(channel: FramedChannel) -> None:
        pid = call(channel, "proc.start", {"argv": ["true"], "env": {}, "stdin": False})["result"]["pid"]  # type: ignore[index]
        while True:
            header = channel.recv().header
            if header["kind"] == "event" and header.get("event") == "proc.exit" and header.get("pid") == pid:
                return

    work = Path(os.environ["MVM_HOME"])
    rows = []
    for index in range(runs + 1):
        sid = "ph-" + secrets.token_hex(4)
        spec = SandboxSpec(sandbox_id=sid, template=template, resources=Resources(), network=NetworkPolicy(),
                           state_dir=work / sid)
        instance = vm_backend.VmBackend(use_ready_snapshots=True).create(spec)
        marks.clear()
        start = time.perf_counter()
        channel = FramedChannel(instance.start())
        marks["cont_connect"] = time.perf_counter()
        channel.handshake("supervisor")
        marks["agent_hello"] = time.perf_counter()
        call(channel, "agent.configure", {"clock_epoch": time.time(), "entropy_hex": secrets.token_hex(32),
                                          "hostname": "sandbox", **instance.agent_limits()})
        marks["agent_configure"] = time.perf_counter()
        run_true(channel)
        marks["first_true"] = time.perf_counter()
        assert instance.machine.proc is not None
        fields = Path(f"/proc/{instance.machine.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        qemu_cpu = (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
        assert instance.machine.qmp is not None
        jit = instance.machine.qmp.execute("human-monitor-command", **{"command-line": "info jit"})
        blocks = re.search(r"TB count\s+(\d+)", jit)
        run_true(channel)
        marks["second_true"] = time.perf_counter()
        channel.close()
        instance.destroy()
        if index == 0:
            continue  # warm-up (page cache, and the ready snapshot is built if missing)
        row, previous = {}, start
        for phase in PHASES[:8]:
            row[phase] = (marks[phase] - previous) * 1000
            previous = marks[phase]
        row["to_first_result"] = (marks["first_true"] - start) * 1000
        row["qemu_cpu"] = qemu_cpu
        row["guest_blocks"] = float(blocks.group(1)) if blocks else float("nan")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-process", type=int, default=2)
    parser.add_argument("--other", default=None, help="a checkout of other code to compare with (A)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        print(json.dumps(measure(ns.child)))
        return
    here = Path(__file__).resolve().parent.parent
    variants = [("this checkout", here)] + ([("other", Path(ns.other).resolve())] if ns.other else [])
    home = Path.home() / ".mvm"
    samples: dict[str, list[dict[str, float]]] = {label: [] for label, _ in variants}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="mvm-phases-", dir="/var/tmp") as tmp:
        env = {**os.environ, "MVM_HOME": str(Path(tmp) / "home"),
               "MVM_TEMPLATES": os.environ.get("MVM_TEMPLATES", str(home / "templates")),
               "MVM_CACHE": os.environ.get("MVM_CACHE", str(home / "cache"))}
        for _ in range(ns.rounds):
            for label, root in variants:
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(ns.per_process)],
                                     env={**env, "PYTHONPATH": str(root / "src")}, capture_output=True, text=True,
                                     check=True).stdout
                samples[label] += json.loads(out.strip().splitlines()[-1])
                loads.append(os.getloadavg()[0])
    print(f"VM restore from the ready snapshot, phases in ms (median of {ns.rounds * ns.per_process}; "
          f"load average {min(loads):.1f}-{max(loads):.1f}; qemu_cpu = QEMU's CPU time up to the first result; "
          "guest_blocks = blocks of guest code TCG translated from the restore to the first result: QEMU starts "
          "with an empty translation cache, so this is the guest's cold-code cost, and unlike times it hardly "
          "moves with the host's load)")
    print("| phase | " + " | ".join(label for label, _ in variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for phase in PHASES:
        print(f"| {phase} | " + " | ".join(f"{statistics.median(r[phase] for r in samples[label]):.0f}"
                                          for label, _ in variants) + " |")


if __name__ == "__main__":
    main()
