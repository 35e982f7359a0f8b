"""``python -m mvm.supervisor SANDBOX_DIR --ready-fd N`` — started by ``launch.spawn_supervisor``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .server import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="mvm-supervisor")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--ready-fd", type=int, required=True)
    ns = parser.parse_args()
    return run(ns.directory, ns.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
