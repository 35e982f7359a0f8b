"""Every row of the SDK operations cookbook, live, printing what each returns.

    .venv/bin/python examples/cookbook_tour.py            # default backend (a microVM when possible)
    MVM_BACKEND=namespace .venv/bin/python examples/cookbook_tour.py
"""

import time

import mvm

with mvm.Sandbox.create(
    "python-3.13",
    workload_id="cookbook-tour",
    ttl="10m",
    resources=mvm.resources(cpu_cores=1, memory_mb=512, rootfs_size_mb=1024),
    network=mvm.network(mode="deny"),
) as sandbox:
    info = sandbox.describe()
    print(f"sandbox {info.name}: backend={info.backend} isolation={info.isolation} "
          f"accel={info.details.get('accel', '-')}")

    # Write file / capture command result
    sandbox.files.write("/app/main.py", "print('hello from mvm')")
    result = sandbox.commands.run(["python", "/app/main.py"], timeout_seconds=30)
    print(f"commands.run: exit_code={result.exit_code} stdout={result.stdout!r} audit_id={result.audit_id}")
    print(f"  signed receipt: {result.receipt_path}")

    # Start command (a handle that outlives the call)
    server = sandbox.commands.start(["python", "-c", "import time; print('worker up', flush=True); time.sleep(600)"],
                                    env={"MODE": "dev"})
    print(f"commands.start: pid={server.pid} first line={next(iter(server.stdout))!r}")

    # Read / list / remove files (bytes from the guest are untrusted: reads are bounded)
    sandbox.files.write("/work/input.json", b"{}")
    sandbox.commands.run(["sh", "-c", "cp /work/input.json /work/output.json"])
    print(f"files.read: {sandbox.files.read('/work/output.json', max_bytes=1024)!r}")
    print(f"files.list: {[entry.name for entry in sandbox.files.list('/work')]}")
    sandbox.files.remove("/work/output.json")
    print(f"files.remove: exists afterwards = {sandbox.files.exists('/work/output.json')}")

    # Logs (policy visible: secrets redacted)
    lines = [e for e in sandbox.logs(follow=False, redact=True) if e.source.startswith("process:")]
    print(f"logs: {len(lines)} process lines, e.g. {lines[0].source} {lines[0].stream}: {lines[0].message!r}")

    # Pause / resume
    sandbox.pause()
    print(f"pause: state={sandbox.describe().state}")
    sandbox.resume()
    print(f"resume: state={sandbox.describe().state}")

    # Snapshot save / restore (sealed at rest, explicit retention)
    sandbox.files.write("/work/state.txt", "before the snapshot")
    snapshot = sandbox.snapshot(name="after-index", expires="1h")
    print(f"snapshot: id={snapshot.id} kind={snapshot.kind} size={snapshot.size_bytes} bytes")
    sandbox.files.write("/work/state.txt", "after the snapshot")
    started = time.perf_counter()
    sandbox.resume(snapshot=snapshot.id)
    print(f"resume(snapshot): state.txt={sandbox.files.read('/work/state.txt')!r} "
          f"in {(time.perf_counter() - started) * 1000:.0f} ms")

    # Stop (keeps the disk) / start
    sandbox.stop()
    sandbox.start()
    print(f"stop+start: state.txt={sandbox.files.read('/work/state.txt')!r}")
print("destroyed: the context manager called kill()")
