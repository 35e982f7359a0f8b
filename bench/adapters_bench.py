"""The framework adapters' cost, per backend, against direct SDK calls in the same run.

* suites: wall time of Inspect's self-check and LangChain's sandbox suite
  (``tests/integrations``) for one backend, and their pass counts;
* per call: the Inspect adapter's ``exec``/``read_file`` and the Deep Agents backend's
  ``execute``/``download_files`` against ``commands.run``/``files.read`` on the same
  sandbox (medians of ``--calls`` calls each, Inspect's on one event loop), printed as the overhead in
  milliseconds and as a ratio.

    .venv/bin/python bench/adapters_bench.py [--backend namespace|vm ...] [--calls 30] [--no-suites]

Needs the extras (``pip install -e '.[test]'``); runs in a throw-away MVM_HOME.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
os.environ["MVM_HOME"] = tempfile.mkdtemp(prefix="mvmb-", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["MVM_HOME"], True)

SUITES = {
    "inspect self-check": ("tests/integrations/test_inspect_self_check.py", "{backend}"),
    "langchain sandbox suite": ("tests/integrations/test_deepagents_standard.py", "On{Backend}"),
}


def run_suite(path: str, selector: str) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", path, "-k", selector],
        cwd=REPO, capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - started
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-200:]
    return elapsed, re.sub(r" in [0-9.]+s.*", "", summary)


def median_ms(fn: Callable[[], object], calls: int) -> float:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


async def amedian_ms(fn: Callable[[], Awaitable[object]], calls: int) -> float:
    """Like ``median_ms`` for a coroutine function, all calls on one event loop (as in an eval)."""
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def per_call(backend: str, calls: int) -> list[tuple[str, float, float]]:
    import anyio

    from mvm.integrations.deepagents import MvmSandboxBackend
    from mvm.integrations.inspect_ai import MvmSandboxConfig, MvmSandboxEnvironment

    config = MvmSandboxConfig(backend=backend, ttl="30m")  # type: ignore[arg-type]
    environments = anyio.run(MvmSandboxEnvironment.sample_init, "bench", config, {})
    inspect_env = environments["default"]
    assert isinstance(inspect_env, MvmSandboxEnvironment)
    sandbox = inspect_env.sandbox
    agents = MvmSandboxBackend(sandbox)
    payload = os.urandom(256 * 1024)
    sandbox.files.write("/root/bench.bin", payload)
    rows = []
    try:
        inspect_pairs: list[tuple[str, Callable[[], Awaitable[object]], Callable[[], object]]] = [
            ("exec (Inspect) vs commands.run", lambda: inspect_env.exec(["true"]),
             lambda: sandbox.commands.run(["true"])),
            ("read_file 256 KiB (Inspect) vs files.read", lambda: inspect_env.read_file("bench.bin", text=False),
             lambda: sandbox.files.read("/root/bench.bin")),
        ]
        for name, adapter_async, direct in inspect_pairs:
            anyio.run(adapter_async), direct()  # warm both paths
            rows.append((name, anyio.run(amedian_ms, adapter_async, calls), median_ms(direct, calls)))
        agent_pairs: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            ("execute (Deep Agents) vs commands.run", lambda: agents.execute("true"),
             lambda: sandbox.commands.run("true")),
            ("download_files 256 KiB (Deep Agents) vs files.read",
             lambda: agents.download_files(["/root/bench.bin"]), lambda: sandbox.files.read("/root/bench.bin")),
        ]
        for name, adapter, direct in agent_pairs:
            adapter(), direct()
            rows.append((name, median_ms(adapter, calls), median_ms(direct, calls)))
    finally:
        anyio.run(MvmSandboxEnvironment.sample_cleanup, "bench", config, environments, False)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=["namespace", "vm"])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--no-suites", action="store_true")
    args = parser.parse_args()
    for backend in args.backend or ["namespace", "vm"]:
        print(f"== {backend}")
        if not args.no_suites:
            for label, (path, selector) in SUITES.items():
                elapsed, summary = run_suite(path, selector.format(backend=backend, Backend=backend.capitalize()))
                print(f"  {label:<28} {elapsed:7.1f} s   {summary}")
        heading = f"per call (median of {args.calls})"
        print(f"  {heading:<52} {'adapter':>9} {'direct':>9} {'overhead':>9} ratio")
        for name, adapter_ms, direct_ms in per_call(backend, args.calls):
            print(f"  {name:<52} {adapter_ms:7.2f}ms {direct_ms:7.2f}ms {adapter_ms - direct_ms:+7.2f}ms "
                  f"{adapter_ms / direct_ms:5.2f}x")


if __name__ == "__main__":
    main()
