"""What a reader that stops reading a process's output costs (docs/reliability.md, "A reader
that stops reading"): a guest process writes ``--mib`` MiB to stdout; the caller opens its
output stream, takes the first chunk and then reads nothing until the writer has made no
progress for 1.5 s. Prints how far the writer got, how much the resident memory of this
process (the client) and of the supervisor grew meanwhile, then the time to read the rest --
against the baseline of the same flood read as it comes, in the same run.

    .venv/bin/python bench/stalled_reader_bench.py [--mib 256]

Runs in a throw-away MVM_HOME (templates and caches shared with ~/.mvm), namespace backend.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MVM_TEMPLATES", str(Path.home() / ".mvm" / "templates"))
os.environ.setdefault("MVM_CACHE", str(Path.home() / ".mvm" / "cache"))
os.environ["MVM_HOME"] = tempfile.mkdtemp(prefix="mvmb-", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["MVM_HOME"], True)

import mvm  # noqa: E402

MIB = 1024 * 1024


def flood_script(mib: int) -> str:
    """Prints "ready", waits for a line on stdin, writes ``mib`` MiB noting its progress."""
    return (
        "import os, sys\n"
        "out = sys.stdout.buffer\n"
        "open('/tmp/written', 'w').write('0')\n"
        "out.write(b'ready\\n'); out.flush()\n"
        "sys.stdin.readline()\n"
        f"for i in range({mib}):\n"
        "    out.write(b'y' * 1048575 + b'\\n'); out.flush()\n"
        "    open('/tmp/written.new', 'w').write(str(i + 1)); os.replace('/tmp/written.new', '/tmp/written')\n"
    )


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def one_run(sandbox: mvm.Sandbox, mib: int, *, stall: bool) -> None:
    supervisor = int(sandbox.describe().details["supervisor_pid"])
    process = sandbox.commands.start(["python3", "-c", flood_script(mib)], stdin=True)
    chunks = process.output()
    assert next(chunks) == ("stdout", "ready\n")
    before = rss(os.getpid()), rss(supervisor)
    peak = list(before)
    process.send_stdin("go\n")
    received = 0
    started = time.monotonic()
    if stall:
        last, since = -1, time.monotonic()
        while True:
            written = int(sandbox.files.read_text("/tmp/written"))
            peak = [max(peak[0], rss(os.getpid())), max(peak[1], rss(supervisor))]
            if written != last:
                last, since = written, time.monotonic()
            elif time.monotonic() - since >= 1.5:
                break
            time.sleep(0.05)
        print(f"  stalled reader: the writer stopped after {last} of {mib} MiB; RSS growth while stalled: "
              f"client {(peak[0] - before[0]) / MIB:.1f} MiB, supervisor {(peak[1] - before[1]) / MIB:.1f} MiB")
        started = time.monotonic()
    for _, text in chunks:
        received += len(text)
        peak = [max(peak[0], rss(os.getpid())), peak[1]]
    took = time.monotonic() - started
    assert received == mib * MIB, received
    label = "then read the rest" if stall else "read as it comes (baseline)"
    print(f"  {label}: {mib} MiB in {took:.2f} s, {mib / took:.0f} MiB/s; "
          f"client RSS peak growth {(peak[0] - before[0]) / MIB:.1f} MiB")
    process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="15m") as sandbox:
        print(f"namespace, {args.mib} MiB of stdout, Process.output():")
        one_run(sandbox, args.mib, stall=False)
        one_run(sandbox, args.mib, stall=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
