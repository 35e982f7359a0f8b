/**
 * `repr()`-style rendering of values in error messages, so a TypeScript error reads
 * exactly like the Python SDK's (`resources.memory_mb: 'x' is not a number ...`).
 * @internal
 */

export function repr(value: unknown): string {
  if (value === undefined || value === null) return "None";
  if (typeof value === "boolean") return value ? "True" : "False";
  if (typeof value === "number") {
    if (Number.isNaN(value)) return "nan";
    if (value === Infinity) return "inf";
    if (value === -Infinity) return "-inf";
    return String(value);
  }
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "string") return strRepr(value);
  if (Array.isArray(value)) return "[" + value.map(repr).join(", ") + "]";
  if (value instanceof Uint8Array) return `b'${Buffer.from(value).toString("latin1")}'`;
  if (typeof value === "object") {
    const ctor = (value as object).constructor;
    if (ctor && ctor !== Object && typeof (value as { toString?: unknown }).toString === "function") {
      const text = String(value);
      if (text !== "[object Object]") return text;
    }
    return "{" + Object.entries(value as object).map(([k, v]) => `${strRepr(k)}: ${repr(v)}`).join(", ") + "}";
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

/** Python's `type(value).__name__` for the JS types a caller may pass. */
export function typeName(value: unknown): string {
  if (value === null || value === undefined) return "NoneType";
  if (typeof value === "string") return "str";
  if (typeof value === "number") return Number.isInteger(value) ? "int" : "float";
  if (typeof value === "boolean") return "bool";
  if (Array.isArray(value)) return "list";
  if (value instanceof Uint8Array) return "bytes";
  if (typeof value === "object") return (value as object).constructor?.name === "Object" ? "dict" : (value as object).constructor?.name ?? "object";
  return typeof value;
}
