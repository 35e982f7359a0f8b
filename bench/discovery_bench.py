"""Discovery speed: ``Sandbox.list()``, ``Sandbox.connect(name)`` and ``mvmctl ls --json``
with N running sandboxes, as ratios against a floor measured in the same run.

    .venv/bin/python bench/discovery_bench.py [--sandboxes 20] [--runs 30] [--backend namespace] [--against SRC_DIR]

The floor is reading every sandbox's on-disk record (``os.listdir`` + ``json.load`` of each
``state.json``): what a listing cannot do without. The CLI's start-up (``mvmctl --help``,
paid by every ``mvmctl`` call, and so by every TypeScript create, which runs ``mvmctl up``)
and ``mvmctl ls`` are compared with a bare interpreter start (``python -c pass``), and
``mvmctl ls`` with ``mvmctl --help`` (what listing adds to the start-up). Also run with one
supervisor SIGSTOP'ed: a listing must not wait on it. The sandboxes live in a private ``MVM_HOME``.

``--against SRC_DIR`` (an older checkout's ``src``) also times the ``mvmctl`` rows with that
code (``PYTHONPATH=SRC_DIR``), alternating call by call with this checkout's, so both see
the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

_USER_HOME = Path(os.environ.get("MVM_HOME") or Path.home() / ".mvm")
os.environ.setdefault("MVM_TEMPLATES", str(_USER_HOME / "templates"))
os.environ.setdefault("MVM_CACHE", str(_USER_HOME / "cache"))
_HOME = Path(tempfile.mkdtemp(prefix="mvmb-", dir="/tmp"))  # short: socket paths stay < 108 bytes
os.environ["MVM_HOME"] = str(_HOME)

import mvm  # noqa: E402
from mvm.paths import sandboxes_dir  # noqa: E402

TEMPLATE = "python-3.13"
MVMCTL = str(Path(sys.executable).with_name("mvmctl"))


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def row(label: str, ours: list[float], base: list[float], base_label: str) -> None:
    o, b = statistics.median(ours) * 1000, statistics.median(base) * 1000
    print(f"| {label:<40} | {o:9.2f} ms | {base_label:<30} | {b:9.2f} ms | {o / b:7.2f}x |")


def read_records() -> list[dict[str, object]]:
    found = []
    for entry in sorted(os.listdir(sandboxes_dir())):
        try:
            with open(sandboxes_dir() / entry / "state.json") as fh:
                found.append(json.load(fh))
        except (OSError, ValueError):
            pass
    return found


def cli_rows(sandboxes: int, runs: int, against: Path | None) -> None:
    """``mvmctl --help`` and ``mvmctl ls --json`` against ``python -c pass``, each code
    variant's calls alternating with the others'."""
    variants = {"": dict(os.environ)}
    if against is not None:
        variants[", against"] = {**os.environ, "PYTHONPATH": str(against.resolve())}
    argvs = {"bare": [sys.executable, "-c", "pass"], "help": [MVMCTL, "--help"], "ls": [MVMCTL, "ls", "--json"]}
    samples: dict[tuple[str, str], list[float]] = {(v, a): [] for v in variants for a in argvs}
    for _ in range(runs):
        for variant, env in variants.items():
            for what, argv in argvs.items():
                start = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True, env=env)
                samples[variant, what].append(time.perf_counter() - start)
    for variant in variants:
        bare, help_, listing = (samples[variant, what] for what in argvs)
        row(f"mvmctl --help (CLI start-up){variant}", help_, bare, "python -c pass")
        row(f"mvmctl ls --json, {sandboxes} sandboxes{variant}", listing, bare, "python -c pass")
        row(f"mvmctl ls --json, {sandboxes} sandboxes{variant}", listing, help_, "mvmctl --help")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sandboxes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--backend", default="namespace")
    parser.add_argument("--against", type=Path, help="another checkout's src: its mvmctl timed alternately")
    ns = parser.parse_args()
    boxes = []
    try:
        for i in range(ns.sandboxes):
            boxes.append(mvm.Sandbox.create(TEMPLATE, name=f"bench-{i}", backend=ns.backend, ttl="15m"))
        assert len(mvm.Sandbox.list()) == ns.sandboxes
        print(f"backend={ns.backend} sandboxes={ns.sandboxes} runs={ns.runs} host_cores={os.cpu_count()}")
        print("| measurement                              |      mvm     | floor                          "
              "|    floor     |  ratio   |")
        print("|---|---|---|---|---|")
        floor = timed(read_records, ns.runs)
        row(f"Sandbox.list(), {ns.sandboxes} sandboxes", timed(mvm.Sandbox.list, ns.runs), floor,
            "read every state.json")
        last = f"bench-{ns.sandboxes - 1}"
        row("Sandbox.connect(name)", timed(lambda: mvm.Sandbox.connect(last).close(), ns.runs), floor,
            "read every state.json")
        cli_rows(ns.sandboxes, max(3, ns.runs // 5), ns.against)
        stopped = int(boxes[0].describe().details["supervisor_pid"])
        os.kill(stopped, signal.SIGSTOP)
        try:
            row("Sandbox.list(), one supervisor stopped", timed(mvm.Sandbox.list, max(3, ns.runs // 5)), floor,
                "read every state.json")
        finally:
            os.kill(stopped, signal.SIGCONT)
    finally:
        for box in boxes:
            box.kill()
        shutil.rmtree(_HOME, ignore_errors=True)


if __name__ == "__main__":
    main()
