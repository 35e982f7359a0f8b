/**
 * Durations for TTLs and snapshot retention, exactly as `mvm/durations.py` reads them:
 * `"90s"`, `"30m"`, `"24h"`, `"7d"`, `"1h30m"`, `"2w"`, or a number of seconds
 * (`300` or `"300"`).
 */

import { InvalidArgument } from "./errors.js";
import { kindOf, shown } from "./shown.js";

export const DURATION_HELP = 'seconds (e.g. 300) or a string like "90s", "30m", "24h", "7d", "2w", "1h30m"';
/** 100 years; anything longer is a typo. */
export const MAX_DURATION_SECONDS = 100 * 365 * 86400;
const UNITS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };

/** A positive number of whole seconds (fractions round up); `InvalidArgument` naming `field` otherwise. */
export function parseDuration(value: unknown, field = "duration"): number {
  let seconds: number;
  if (typeof value === "boolean" || value === null || value === undefined) {
    throw InvalidArgument.create(field, `${shown(value)} is not a duration`, DURATION_HELP);
  }
  if (typeof value === "number") {
    seconds = value;
  } else if (typeof value === "string") {
    const text = value.trim().toLowerCase().replace(/ /g, "");
    if (/^\d+$/.test(text)) {
      seconds = parseInt(text, 10);
    } else if (/^(?:\d+[smhdw])+$/.test(text)) {
      seconds = 0;
      for (const match of text.matchAll(/(\d+)([smhdw])/g)) seconds += parseInt(match[1], 10) * UNITS[match[2]];
    } else {
      throw InvalidArgument.create(field, `${shown(value)} is not a duration`, DURATION_HELP);
    }
  } else {
    throw InvalidArgument.create(field, `${kindOf(value)} is not a duration`, DURATION_HELP);
  }
  if (!Number.isFinite(seconds) || seconds <= 0) {
    throw InvalidArgument.create(field, `${shown(value)} must be longer than zero`, DURATION_HELP);
  }
  if (seconds > MAX_DURATION_SECONDS) {
    throw InvalidArgument.create(field, `${shown(value)} is longer than 100 years`, DURATION_HELP);
  }
  return Math.ceil(seconds);
}
