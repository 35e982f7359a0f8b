/**
 * `@mvm/sdk`: disposable, policy-bound sandboxes (microVMs or namespaces) for untrusted
 * code on your own Linux host — the TypeScript twin of the Python SDK (`import mvm`).
 *
 * ```ts
 * import { Sandbox, network, resources, secret } from "@mvm/sdk";
 *
 * await using sandbox = await Sandbox.create("python-3.13", {
 *   workloadId: "agent-tool",
 *   ttl: "30m",
 *   resources: resources({ cpuCores: 1, memoryMb: 512, rootfsSizeMb: 1024 }),
 *   network: network({ mode: "deny" }),
 * });
 * await sandbox.files.write("/app/main.py", "print('hello from mvm')");
 * const result = await sandbox.commands.run(["python", "/app/main.py"], { timeoutSeconds: 30 });
 * console.log(result.exitCode, result.stdout, result.auditId);
 * ```
 */

import "./polyfill.js";

export {
  Commands, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_READ_BYTES, Files, gc, Network, pools, Ports, Process, Sandbox, SIGNALS,
  type CreateOptions, type FileUserOptions, type ForwardOptions, type LogsOptions, type NetworkUpdateOptions,
  type OutputChunk, type OutputOptions,
  type RunOptions, type StartOptions,
} from "./sandbox.js";
export { Pool, pool, type PoolCreateOptions, type PoolOptions } from "./pool.js";
export {
  CommandResult, FileEntry, LogEvent, NetworkInfo, PoolInfo, PortForward, ProcessInfo, SANDBOX_STATES, SandboxInfo, Snapshot,
  type EgressInfo, type PoolMembership, type FileType, type PortForwardFields, type SandboxState, type SnapshotKind,
} from "./models.js";
export {
  HOST_ALIAS, LIMITS, network, NETWORK_MODES, NetworkPolicy, resources, Resources, secret, SecretRef,
  type NetworkMode, type NetworkOptions, type ResourcesOptions,
} from "./policy.js";
export * from "./errors.js";
export { parseDuration, DURATION_HELP } from "./durations.js";
export { currentMode, MODES, type Env, type EnvValue, type Mode } from "./spec.js";
export { closestName, currentRecording, RecordTransport, Recording, resetRecording, RECORDING_ENV } from "./recording.js";
export type { RequestContext, Transport, TransportCallOptions } from "./transport.js";
export { SupervisorClient, type CallOptions, type CallResult, type StreamChunk } from "./client.js";
export * as protocol from "./protocol.js";
export { ProtocolError } from "./protocol.js";
export { resolveSecret, envVarFor } from "./secrets.js";

export const VERSION = "0.1.0";
