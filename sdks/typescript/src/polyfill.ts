/**
 * `Symbol.asyncDispose` / `Symbol.dispose` for Node 18 (Node 20 has them), so
 * `await using` compiled by TypeScript (which downlevels it) works everywhere.
 * @internal
 */

const symbols = Symbol as unknown as { asyncDispose?: symbol; dispose?: symbol };
symbols.asyncDispose ??= Symbol.for("Symbol.asyncDispose");
symbols.dispose ??= Symbol.for("Symbol.dispose");

export {};
