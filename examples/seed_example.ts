/**
 * The seed's example (sdk-operations-cookbook), TypeScript column, with the python-3.13
 * template — the twin of seed_example.py: both compile to the same workload IR.
 *
 *     mvmctl compile examples/seed_example.ts --out /tmp/sandbox-ir
 *     mvmctl run --mode plan examples/seed_example.ts
 *     mvmctl run --mode live examples/seed_example.ts
 *
 * `src/` (beside this file) is copied into the sandbox's /app/src. The command's env
 * refers to the secret "api-key" by name: set it first with `mvmctl secret set api-key`
 * (or export MVM_SECRET_API_KEY) for the plan to be admitted and the live run to start.
 */

import { Sandbox, network, resources, secret } from "@mvm/sdk";

await using sandbox = await Sandbox.create("python-3.13", {
  workloadId: "agent-tool",
  ttl: "30m",
  include: ["src"],
  resources: resources({ cpuCores: 1, memoryMb: 512, rootfsSizeMb: 1024 }),
  network: network({ mode: "deny" }),
});
await sandbox.files.write("/app/main.py", "print('hello from mvm')");
await sandbox.commands.start(["python", "/app/main.py"], {
  env: { MODE: "dev", API_KEY: secret("api-key") },
});
