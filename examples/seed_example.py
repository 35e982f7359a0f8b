"""The seed's example (sdk-operations-cookbook), with the python-3.13 template.

    mvmctl compile examples/seed_example.py --out /tmp/sandbox-ir
    mvmctl run --mode plan examples/seed_example.py
    mvmctl run --mode live examples/seed_example.py

`src/` (beside this file) is copied into the sandbox's /app/src. The command's env
refers to the secret "api-key" by name: set it first with `mvmctl secret set api-key`
(or export MVM_SECRET_API_KEY) for the plan to be admitted and the live run to start.
"""

import mvm

with mvm.Sandbox.create(
    "python-3.13",
    workload_id="agent-tool",
    ttl="30m",
    include=["src"],
    resources=mvm.resources(cpu_cores=1, memory_mb=512, rootfs_size_mb=1024),
    network=mvm.network(mode="deny"),
) as sandbox:
    sandbox.files.write("/app/main.py", "print('hello from mvm')")
    sandbox.commands.start(
        ["python", "/app/main.py"],
        env={"MODE": "dev", "API_KEY": mvm.secret("api-key")},
    )
