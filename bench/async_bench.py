"""AsyncSandbox throughput against the sync SDK driven by threads, in one run.

    .venv/bin/python bench/async_bench.py [--backend namespace|vm] [--ops 1000] [--sandboxes 10] [--threads 32]

Both sides run ``commands.run(["true"])`` ``--ops`` times spread over the same
``--sandboxes`` sandboxes: async from one event loop (all ops in flight at once,
``asyncio.gather``), sync from a thread pool of ``--threads`` workers sharing one
``Sandbox`` handle per sandbox. Prints ops/s of each and their ratio; the order of the
two sides alternates over ``--rounds`` and the best round of each is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mvm

TEMPLATE = "python-3.13"


async def async_side(names: list[str], ops: int) -> float:
    sandboxes = [await mvm.AsyncSandbox.connect(name) for name in names]
    try:
        await asyncio.gather(*(s.commands.run(["true"]) for s in sandboxes))  # connections warm
        start = time.perf_counter()
        results = await asyncio.gather(*(sandboxes[i % len(sandboxes)].commands.run(["true"]) for i in range(ops)))
        elapsed = time.perf_counter() - start
    finally:
        for sandbox in sandboxes:
            await sandbox.close()
    assert all(r.exit_code == 0 for r in results)
    return ops / elapsed


def sync_side(names: list[str], ops: int, threads: int) -> float:
    sandboxes = [mvm.Sandbox.connect(name) for name in names]
    try:
        for sandbox in sandboxes:
            sandbox.commands.run(["true"])
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            results = list(pool.map(lambda i: sandboxes[i % len(sandboxes)].commands.run(["true"]), range(ops)))
            elapsed = time.perf_counter() - start
    finally:
        for sandbox in sandboxes:
            sandbox.close()
    assert all(r.exit_code == 0 for r in results)
    return ops / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="namespace", choices=["namespace", "vm"])
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--sandboxes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    resources = mvm.resources(cpu_cores=1, memory_mb=256 if args.backend == "namespace" else 512)
    created = [
        mvm.Sandbox.create(TEMPLATE, backend=args.backend, ttl="20m", resources=resources)
        for _ in range(args.sandboxes)
    ]
    names = [sandbox.name for sandbox in created]
    best = {"async": 0.0, "sync": 0.0}
    try:
        for round_ in range(args.rounds):
            order = ["async", "sync"] if round_ % 2 == 0 else ["sync", "async"]
            for side in order:
                if side == "async":
                    rate = asyncio.run(async_side(names, args.ops))
                else:
                    rate = sync_side(names, args.ops, args.threads)
                best[side] = max(best[side], rate)
                print(f"round {round_ + 1} {side:5s}: {rate:8.1f} ops/s", flush=True)
    finally:
        for sandbox in created:
            sandbox.kill()
    shape = f"{args.sandboxes} {args.backend} sandboxes, best of {args.rounds}"
    print(f"\n{args.ops} x commands.run(['true']) over {shape}")
    print(f"  async, one loop           : {best['async']:8.1f} ops/s")
    print(f"  sync, {args.threads:3d} threads         : {best['sync']:8.1f} ops/s")
    print(f"  ratio async / sync-threaded: {best['async'] / best['sync']:.2f}x")


if __name__ == "__main__":
    main()
