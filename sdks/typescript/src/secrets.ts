/**
 * Resolving `secret(name)` references in live mode, exactly as `mvm.security.secrets`
 * does: the host keystore first (`$MVM_HOME/secrets/<name>.secret`, AES-256-GCM under
 * `$MVM_HOME/keys/secrets.key` with the name in the associated data), then
 * `MVM_SECRET_<NAME>` in the environment. Values are never written anywhere.
 * @internal
 */

import { createDecipheriv } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { join } from "node:path";

import { KeystoreError, SecretNotFound } from "./errors.js";
import { mvmHome } from "./paths.js";
import { validateSecretName } from "./policy.js";
import { shown } from "./shown.js";

const AD_PREFIX = Buffer.from("mvm-secret-v1\0", "latin1");

/** `MVM_SECRET_<NAME>`: upper-cased, `-` and `.` become `_`. */
export function envVarFor(name: string): string {
  validateSecretName(name);
  return "MVM_SECRET_" + name.toUpperCase().replace(/[-.]/g, "_");
}

function hint(name: string): string {
  return `set it with \`mvmctl secret set ${name}\` or export ${envVarFor(name)}`;
}

function keystorePath(name: string): string {
  return join(mvmHome(), "secrets", `${name}.secret`);
}

function isFile(path: string): boolean {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

function keystoreGet(name: string): string {
  let record: Record<string, unknown>;
  try {
    record = JSON.parse(readFileSync(keystorePath(name), "utf8")) as Record<string, unknown>;
  } catch (exc) {
    throw new KeystoreError(`keystore entry for secret ${shown(name)} is unreadable: ${(exc as Error).message}`, { name });
  }
  if (typeof record !== "object" || record === null || record.v !== 1) {
    throw new KeystoreError(`keystore entry for secret ${shown(name)} has an unknown format`, { name });
  }
  let key: Buffer;
  try {
    key = readFileSync(join(mvmHome(), "keys", "secrets.key"));
  } catch {
    throw new KeystoreError(`secret ${shown(name)} exists but the keystore key (keys/secrets.key) is missing`, { name });
  }
  if (key.length !== 32) throw new KeystoreError(`key file keys/secrets.key is corrupt (expected 32 bytes, found ${key.length})`);
  try {
    const nonce = Buffer.from(String(record.nonce), "base64");
    const sealed = Buffer.from(String(record.ciphertext), "base64");
    const decipher = createDecipheriv("aes-256-gcm", key, nonce);
    decipher.setAAD(Buffer.concat([AD_PREFIX, Buffer.from(name, "ascii")]));
    decipher.setAuthTag(sealed.subarray(sealed.length - 16));
    return Buffer.concat([decipher.update(sealed.subarray(0, sealed.length - 16)), decipher.final()]).toString("utf8");
  } catch {
    throw new KeystoreError(`keystore entry for secret ${shown(name)} does not decrypt (edited, moved from another `
      + "name, or a different keystore key)", { name });
  }
}

/** The value of secret `name`: keystore first, then `MVM_SECRET_<NAME>`; `SecretNotFound` when neither has it. */
export function resolveSecret(name: string, environ: NodeJS.ProcessEnv = process.env): string {
  validateSecretName(name);
  if (isFile(keystorePath(name))) return keystoreGet(name);
  const value = environ[envVarFor(name)];
  if (value === undefined) throw SecretNotFound.create(name, hint(name));
  return value;
}
