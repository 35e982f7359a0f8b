/**
 * Values as error messages show them, worded for a user of either SDK: the same rule as
 * Python's `mvm.errors.shown` / `kind_of`, so both SDKs' messages read alike
 * (`resources.max_processes: true is not a number ...`).
 * @internal
 */

/** `null`, `true`/`false`, numbers, text in single quotes, lists and objects item by item. */
export function shown(value: unknown): string {
  if (value === undefined || value === null) return "null";
  if (typeof value === "boolean") return value ? "true" : "false";
  if (typeof value === "number") {
    if (Number.isNaN(value)) return "nan";
    if (value === Infinity) return "inf";
    if (value === -Infinity) return "-inf";
    return String(value);
  }
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "string") return strRepr(value);
  if (Array.isArray(value)) return "[" + value.map(shown).join(", ") + "]";
  if (value instanceof Uint8Array) return `b'${Buffer.from(value).toString("latin1")}'`;
  if (typeof value === "object") {
    const ctor = (value as object).constructor;
    if (ctor && ctor !== Object && typeof (value as { toString?: unknown }).toString === "function") {
      const text = String(value);
      if (text !== "[object Object]") return text;
    }
    return "{" + Object.entries(value as object).map(([k, v]) => `${strRepr(k)}: ${shown(v)}`).join(", ") + "}";
  }
  if (typeof value === "function") return `<function ${value.name || "anonymous"}>`;
  return String(value);
}

function strRepr(text: string): string {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  let out = quote;
  for (const ch of text) {
    const code = ch.codePointAt(0) as number;
    if (ch === "\\") out += "\\\\";
    else if (ch === quote) out += "\\" + quote;
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (code < 0x20 || code === 0x7f) out += "\\x" + code.toString(16).padStart(2, "0");
    else if (code >= 0xd800 && code <= 0xdfff) out += "\\u" + code.toString(16).padStart(4, "0");
    else out += ch;
  }
  return out + quote;
}

/** What a value is: null, boolean, number, string, bytes, list, object; else its class name. */
export function kindOf(value: unknown): string {
  if (value === null || value === undefined) return "null";
  if (typeof value === "string") return "string";
  if (typeof value === "number") return "number";
  if (typeof value === "boolean") return "boolean";
  if (Array.isArray(value)) return "list";
  if (value instanceof Uint8Array) return "bytes";
  if (typeof value === "object") return (value as object).constructor?.name === "Object" ? "object" : (value as object).constructor?.name ?? "object";
  return typeof value;
}
