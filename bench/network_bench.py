"""Network speed over the agent channel, as ratios against direct loopback in the same run.

    .venv/bin/python bench/network_bench.py [--backend namespace|vm] [--mib N] [--conns N]

Rows (each beside the same client/server code over a direct 127.0.0.1 connection):
  forward upload / download    host client -> ports.forward -> guest server, N MiB
  forward connection latency   connect + 1-byte echo + close, per connection
  forward request round trip   1-byte echo on an open connection
  forward CPU per MiB          CPU time of every process involved (client, supervisor, the sandbox's
                               processes: agent and server) per MiB forwarded, against the direct
                               pair's (client and server) -- less sensitive to other load than MiB/s
  egress download / upload     guest client -> HTTP CONNECT proxy -> host server, N MiB
  egress connection latency    guest connect to the proxy + CONNECT + 1-byte echo + close
                               (includes the policy check, the audit record and the log line)
The egress baseline runs the same client in the guest against a server on the guest's own
loopback (the guest's Python and CPU are the same on both sides of the ratio).
Target (issue 5): >= 100 MiB/s through a forward on the namespace backend.
All servers listen on 127.0.0.1 (host) or inside the sandbox; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mvm

TEMPLATE = "python-3.13"
BLOCK = b"\xa5" * (1 << 20)

#: Runs on both sides: "sink" counts bytes until EOF and answers the count, "source N" sends
#: N bytes, "echo" echoes. The first line of a connection picks the mode.
SERVER = r'''
import socket, sys, threading
BLOCK = b"\xa5" * (1 << 20)
def handle(conn):
    with conn:
        line = b""
        while not line.endswith(b"\n"):
            data = conn.recv(1)
            if not data:
                return
            line += data
        mode, *arg = line.split()
        if mode == b"sink":
            total = 0
            while data := conn.recv(1 << 20):
                total += len(data)
            conn.sendall(str(total).encode())
        elif mode == b"source":
            left = int(arg[0])
            while left > 0:
                piece = BLOCK[:left]
                conn.sendall(piece)
                left -= len(piece)
        else:
            while data := conn.recv(65536):
                conn.sendall(data)
def main(port, ready=None):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    if ready:
        open(ready, "w").write(str(srv.getsockname()[1]))
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
'''

#: The egress client, run in the guest: through the proxy (HTTPS_PROXY) or direct.
CLIENT = r'''
import json, os, socket, statistics, sys, time
from urllib.parse import urlsplit
BLOCK = b"\xa5" * (1 << 20)
via, port, mib, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
proxy = urlsplit(os.environ.get("HTTPS_PROXY") or "http://127.0.0.1:3128")
def open_conn():
    if via == "direct":
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    else:
        sock = socket.create_connection((proxy.hostname, proxy.port), timeout=60)
        target = f"host.mvm.internal:{port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
out = {}
sock = open_conn(); sock.sendall(f"source {mib << 20}\n".encode())
start = time.perf_counter(); got = 0
while data := sock.recv(1 << 20):
    got += len(data)
out["download_s"] = time.perf_counter() - start; sock.close(); assert got == mib << 20
sock = open_conn(); sock.sendall(b"sink\n")
start = time.perf_counter()
for _ in range(mib):
    sock.sendall(BLOCK)
sock.shutdown(socket.SHUT_WR); answer = sock.recv(100)
out["upload_s"] = time.perf_counter() - start; sock.close(); assert int(answer) == mib << 20
samples = []
for _ in range(conns):
    start = time.perf_counter()
    sock = open_conn(); sock.sendall(b"echo\nx"); assert sock.recv(1) == b"x"; sock.close()
    samples.append(time.perf_counter() - start)
out["conn_ms"] = statistics.median(samples) * 1000
print(json.dumps(out))
'''


def start_host_server() -> int:
    namespace: dict[str, object] = {"__name__": "bench_server"}
    exec(SERVER, namespace)
    holder: dict[str, int] = {}
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    holder["port"] = srv.getsockname()[1]
    srv.close()
    threading.Thread(target=namespace["main"], args=(holder["port"],), daemon=True).start()  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", holder["port"]), timeout=1).close()
            return holder["port"]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upload(port: int, mib: int) -> float:
    with connect(port) as sock:
        sock.sendall(b"sink\n")
        start = time.perf_counter()
        for _ in range(mib):
            sock.sendall(BLOCK)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(100)
        elapsed = time.perf_counter() - start
    assert int(answer) == mib << 20, answer
    return elapsed


def download(port: int, mib: int) -> float:
    with connect(port) as sock:
        sock.sendall(f"source {mib << 20}\n".encode())
        start = time.perf_counter()
        got = 0
        while data := sock.recv(1 << 20):
            got += len(data)
        elapsed = time.perf_counter() - start
    assert got == mib << 20
    return elapsed


def conn_latency(port: int, count: int) -> float:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        with connect(port) as sock:
            sock.sendall(b"echo\nx")
            assert sock.recv(1) == b"x"
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def round_trip(port: int, count: int) -> float:
    with connect(port) as sock:
        sock.sendall(b"echo\n")
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def best(fn, runs: int) -> float:
    return min(fn() for _ in range(runs))


def cpu_seconds(pids: list[int]) -> float:
    """User + system time of the processes ``pids`` so far (every thread; /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_per_mib(fn, pids: list[int], mib: int) -> tuple[float, float]:
    """(MiB/s, CPU ms per MiB) of ``fn`` -- this process's CPU plus that of ``pids``."""
    own, others = time.process_time(), cpu_seconds(pids)
    elapsed = fn()
    used = time.process_time() - own + cpu_seconds(pids) - others
    return mib / elapsed, used * 1000 / mib


def wait_file(sandbox: mvm.Sandbox, path: str) -> str:
    deadline = time.monotonic() + 60
    while not sandbox.files.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.05)
    return sandbox.files.read(path).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="namespace", choices=["namespace", "vm"])
    parser.add_argument("--mib", type=int, default=0, help="MiB per transfer (default 256 namespace, 32 vm)")
    parser.add_argument("--conns", type=int, default=0, help="connections for latency (default 200 / 30)")
    parser.add_argument("--runs", type=int, default=3, help="transfers per row (the best is kept)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    vm = args.backend == "vm"
    mib = args.mib or (32 if vm else 256)
    conns = args.conns or (30 if vm else 200)
    rows: list[tuple[str, float, float, str]] = []  # name, mvm value, direct value, unit

    host_port = start_host_server()
    direct = {
        "upload": mib / best(lambda: upload(host_port, mib), args.runs),
        "download": mib / best(lambda: download(host_port, mib), args.runs),
        "conn": conn_latency(host_port, conns),
        "rtt": round_trip(host_port, conns * 5),
        "cpu": cpu_per_mib(lambda: upload(host_port, mib) + download(host_port, mib), [], 2 * mib)[1],
    }

    with mvm.Sandbox.create(TEMPLATE, backend=args.backend, ttl="30m",
                            resources=mvm.resources(cpu_cores=1, memory_mb=512)) as sandbox:
        sandbox.files.write("/srv/bench_server.py", SERVER)
        sandbox.commands.start(["python3", "/srv/bench_server.py", "9000", "/tmp/bench.ready"])
        wait_file(sandbox, "/tmp/bench.ready")
        details = sandbox.describe().details
        involved = [int(details["supervisor_pid"]), *map(int, details.get("host_pids") or [])]
        with sandbox.ports.forward(guest_port=9000) as fwd:
            port = fwd.host_port
            forward_cpu = cpu_per_mib(lambda: upload(port, mib) + download(port, mib), involved, 2 * mib)[1]
            rows += [
                ("forward upload", mib / best(lambda: upload(port, mib), args.runs), direct["upload"], "MiB/s"),
                ("forward download", mib / best(lambda: download(port, mib), args.runs), direct["download"],
                 "MiB/s"),
                ("forward connection latency", conn_latency(port, conns), direct["conn"], "ms"),
                ("forward request round trip", round_trip(port, conns * 5), direct["rtt"], "ms"),
                ("forward CPU per MiB", forward_cpu, direct["cpu"], "ms"),
            ]

    allow = [f"host.mvm.internal:{host_port}"]  # the host's loopback, through the egress proxy
    with mvm.Sandbox.create(TEMPLATE, backend=args.backend, ttl="30m", network=mvm.network(mode="allow", allow=allow),
                            resources=mvm.resources(cpu_cores=1, memory_mb=512)) as sandbox:
        sandbox.files.write("/srv/bench_server.py", SERVER)
        sandbox.files.write("/srv/bench_client.py", CLIENT)
        sandbox.commands.start(["python3", "/srv/bench_server.py", "9000", "/tmp/bench.ready"])
        wait_file(sandbox, "/tmp/bench.ready")

        def guest_client(via: str, port: int) -> dict[str, float]:
            runs = []
            for _ in range(args.runs):
                result = sandbox.commands.run(["python3", "/srv/bench_client.py", via, str(port), str(mib),
                                               str(conns)], timeout_seconds=600)
                assert result.exit_code == 0, result.stderr
                runs.append(json.loads(result.stdout))
            return {key: min(run[key] for run in runs) for key in runs[0]}

        proxied = guest_client("proxy", host_port)
        local = guest_client("direct", 9000)
        rows += [
            ("egress download", mib / proxied["download_s"], mib / local["download_s"], "MiB/s"),
            ("egress upload", mib / proxied["upload_s"], mib / local["upload_s"], "MiB/s"),
            ("egress connection latency", proxied["conn_ms"], local["conn_ms"], "ms"),
        ]

    if args.json:
        print(json.dumps([{"row": r[0], "mvm": r[1], "direct": r[2], "unit": r[3]} for r in rows], indent=2))
        return 0
    print(f"backend {args.backend}: {mib} MiB transfers (best of {args.runs}), {conns} connections for latency")
    print(f"{'':30} {'mvm':>12} {'direct':>12} {'ratio':>8}")
    for name, value, base, unit in rows:
        ratio = value / base
        label = "of direct" if unit == "MiB/s" else "x direct"
        digits = 1 if unit == "MiB/s" else 3
        print(f"{name:30} {value:>8.{digits}f} {unit:<5} {base:>7.{digits}f} {unit:<5} {ratio:>6.2f} {label}")
    forward_up = rows[0][1]
    if args.backend == "namespace":
        verdict = "met" if min(rows[0][1], rows[1][1]) >= 100 else "NOT met"
        print(f"target >= 100 MiB/s through a forward (namespace): {verdict} "
              f"(upload {forward_up:.0f}, download {rows[1][1]:.0f} MiB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
