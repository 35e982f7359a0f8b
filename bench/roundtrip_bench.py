"""``commands.run(["true"])`` on the namespace backend: wall time and CPU time per call,
against a local ``subprocess.run(["true"])`` measured in the same run.

    .venv/bin/python bench/roundtrip_bench.py [--runs N] [--rounds R] [--against SRC_DIR]

Wall time moves with the load of the (shared) host; CPU time much less, so both are
printed. CPU per call is user+sys, read from ``/proc/<pid>/stat`` before and after
``runs`` calls, of the client (this process), the supervisor and the guest agent (with
bwrap: every descendant of the supervisor except the commands themselves, whose time
is their parent's ``cutime``, not counted). The local baseline's CPU is this process's.

``--against SRC_DIR`` (an older checkout's ``src``) runs the same measurement with that
code too, alternating rounds (A/B in one run, so both see the same load), and prints
medians over the rounds. Issue 14's target: overhead <= 1 ms over the local baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEMPLATE = "python-3.13"
TARGET_MS = 1.0
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """user+sys of ``pid`` (all its threads), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def measure(runs: int) -> dict[str, float]:
    """One round in this process: ms per call (wall medians, CPU means)."""
    import mvm

    with mvm.Sandbox.create(TEMPLATE, backend="namespace", ttl="10m") as sb:
        for _ in range(20):  # warm: connection, imports, caches
            sb.commands.run(["true"])
        supervisor = int(sb.describe().details["supervisor_pid"])
        sandbox_pids = _descendants(supervisor)  # supervisor, bwrap, agent (no command is running)

        def cpu() -> tuple[float, float]:
            own = os.times()
            return own.user + own.system, sum(_cpu_seconds(p) for p in sandbox_pids)

        client0, sandbox0 = cpu()
        walls = []
        for _ in range(runs):
            start = time.perf_counter()
            sb.commands.run(["true"])
            walls.append(time.perf_counter() - start)
        client1, sandbox1 = cpu()
    local_walls = []
    own0 = os.times()
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(["true"])
        local_walls.append(time.perf_counter() - start)
    own1 = os.times()
    return {
        "wall_ms": statistics.median(walls) * 1000,
        "local_wall_ms": statistics.median(local_walls) * 1000,
        "client_cpu_ms": (client1 - client0) / runs * 1000,
        "sandbox_cpu_ms": (sandbox1 - sandbox0) / runs * 1000,
        "local_cpu_ms": (own1.user + own1.system - own0.user - own0.system) / runs * 1000,
    }


def _round(src: Path, runs: int) -> dict[str, float]:
    """One round in a fresh interpreter importing mvm from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, __file__, "--one-round", "--runs", str(runs)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _print(label: str, rounds: list[dict[str, float]]) -> None:
    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    over = med["wall_ms"] - med["local_wall_ms"]
    verdict = "met" if over <= TARGET_MS else "NOT met"
    cpu = med["client_cpu_ms"] + med["sandbox_cpu_ms"]
    print(f"| {label:<7} | {med['wall_ms']:6.2f} ms | {med['local_wall_ms']:5.2f} ms | {over:+6.2f} ms ({verdict}) "
          f"| {cpu:5.2f} ms = client {med['client_cpu_ms']:.2f} + supervisor/agent {med['sandbox_cpu_ms']:.2f} "
          f"| {med['local_cpu_ms']:.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another checkout's src directory, measured alternately")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.one_round:
        print(json.dumps(measure(ns.runs)))
        return
    here = Path(__file__).resolve().parent.parent / "src"
    variants = {"this": here, **({"against": ns.against.resolve()} if ns.against else {})}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    loads = [_load()]
    for _ in range(ns.rounds):
        for name, src in variants.items():
            results[name].append(_round(src, ns.runs))
            loads.append(_load())
    print(f'commands.run(["true"]), namespace backend: {ns.rounds} round(s) x {ns.runs} calls, '
          f"medians over rounds; load average (1 min) during the run: {', '.join(loads)}; "
          f"target: overhead <= {TARGET_MS:.0f} ms")
    print("| code    |  wall/call | local wall | overhead | CPU/call (user+sys) | local CPU/call |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        _print(name, results[name])


if __name__ == "__main__":
    main()
