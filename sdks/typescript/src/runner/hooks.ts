/**
 * Module hooks for running a workload script with Node (`mvmctl run|compile ./script.ts`):
 *
 * * `@mvm/sdk` resolves to this checkout's build (no install in the script's folder);
 * * `.ts`/`.mts` files are transpiled on load with this repo's `typescript`
 *   (`transpileModule`: types are not checked; inline source maps keep line numbers);
 * * a relative `./x.js` import that only exists as `./x.ts` loads the `.ts`;
 * * the entry `.js` script is loaded as an ES module when it uses `import`/`export`
 *   even without `"type": "module"` nearby.
 *
 * Registered by `boot.ts` with `module.register` (Node ≥ 18.19 / 20.6).
 * @internal
 */

import { existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

interface HookData {
  entry?: string;
}

interface ResolveContext {
  parentURL?: string;
  conditions?: string[];
}

interface ResolveResult {
  url: string;
  format?: string | null;
  shortCircuit?: boolean;
}

interface LoadContext {
  format?: string | null;
  conditions?: string[];
}

interface LoadResult {
  format: string;
  source?: string | ArrayBuffer | Uint8Array | null;
  shortCircuit?: boolean;
}

type NextResolve = (specifier: string, context?: ResolveContext) => Promise<ResolveResult>;
type NextLoad = (url: string, context?: LoadContext) => Promise<LoadResult>;

const HERE = dirname(fileURLToPath(import.meta.url));
const SDK_ENTRY = pathToFileURL(join(HERE, "..", "index.js")).href;
const SDK_DIST = join(HERE, "..");
let entryUrl: string | undefined;

type TS = typeof import("typescript");
let ts: TS | undefined;

function typescript(): TS {
  if (ts === undefined) {
    const require = createRequire(import.meta.url);
    try {
      ts = require("typescript") as TS;
    } catch {
      throw new Error("running a .ts script needs this repo's TypeScript: run `npm ci` in sdks/typescript "
        + "(./setup.sh does it)");
    }
  }
  return ts;
}

export function initialize(data: HookData | undefined): void {
  entryUrl = data?.entry;
}

export async function resolve(specifier: string, context: ResolveContext, next: NextResolve): Promise<ResolveResult> {
  if (specifier === "@mvm/sdk") return { url: SDK_ENTRY, format: "module", shortCircuit: true };
  if (specifier.startsWith("@mvm/sdk/")) {
    const rest = specifier.slice("@mvm/sdk/".length).replace(/\.(ts|js)$/, "");
    return { url: pathToFileURL(join(SDK_DIST, `${rest}.js`)).href, format: "module", shortCircuit: true };
  }
  if ((specifier.startsWith("./") || specifier.startsWith("../")) && specifier.endsWith(".js") && context.parentURL?.startsWith("file:")) {
    const parent = fileURLToPath(context.parentURL);
    const asJs = join(dirname(parent), specifier);
    const asTs = asJs.slice(0, -3) + ".ts";
    if (!existsSync(asJs) && existsSync(asTs)) return { url: pathToFileURL(asTs).href, shortCircuit: true };
  }
  return next(specifier, context);
}

function transpile(url: string): string {
  const path = fileURLToPath(url);
  const source = readFileSync(path, "utf8");
  const t = typescript();
  const out = t.transpileModule(source, {
    fileName: path,
    compilerOptions: {
      module: t.ModuleKind.ESNext,
      target: t.ScriptTarget.ES2022,
      inlineSourceMap: true,
      inlineSources: true,
      esModuleInterop: true,
      verbatimModuleSyntax: false,
    },
  });
  return out.outputText;
}

const ESM_SYNTAX = /^\s*(import\s*[\w{*'"]|export\s)/m;

export async function load(url: string, context: LoadContext, next: NextLoad): Promise<LoadResult> {
  if (url.startsWith("file:") && /\.(ts|mts)$/.test(url)) {
    return { format: "module", source: transpile(url), shortCircuit: true };
  }
  if (url === entryUrl && url.endsWith(".js")) {
    const result = await next(url, context);
    if (result.format === "commonjs") {
      const source = readFileSync(fileURLToPath(url), "utf8");
      if (ESM_SYNTAX.test(source)) return { format: "module", source, shortCircuit: true };
    }
    return result;
  }
  return next(url, context);
}
