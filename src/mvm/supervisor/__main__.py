"""``python -m mvm.supervisor SANDBOX_DIR --ready-fd N`` — started by ``launch.spawn_supervisor``.

The launcher takes the secret env from stdin, forks the real supervisor (adopted
by init, so it outlives its creator) and exits at once — before the heavy imports,
which the supervisor then does while its creator waits on the readiness pipe.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[2] != "--ready-fd":
        print("usage: python -m mvm.supervisor SANDBOX_DIR --ready-fd N", file=sys.stderr)
        return 2
    directory, ready_fd = Path(sys.argv[1]), int(sys.argv[3])
    secret_env = json.loads(sys.stdin.read() or "{}")
    sys.stdin.close()
    if os.fork() > 0:
        os._exit(0)
    from .server import run

    return run(directory, ready_fd, secret_env)


if __name__ == "__main__":
    sys.exit(main())
