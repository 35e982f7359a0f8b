"""Durations for TTLs and snapshot retention: ``"90s"``, ``"30m"``, ``"24h"``, ``"7d"``, ``"1h30m"``,
``"2w"``, a plain number of seconds (``300`` or ``"300"``), or a :class:`datetime.timedelta`.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Any

from mvm.errors import InvalidArgument, kind_of, shown

__all__ = ["DURATION_HELP", "MAX_DURATION_SECONDS", "format_duration", "parse_duration"]

DURATION_HELP = 'seconds (e.g. 300) or a string like "90s", "30m", "24h", "7d", "2w", "1h30m"'
#: 100 years; anything longer is a typo.
MAX_DURATION_SECONDS = 100 * 365 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"(?:\d+[smhdw])+")


def parse_duration(value: Any, field: str = "duration") -> int:
    """A positive number of whole seconds; :class:`InvalidArgument` naming ``field`` otherwise.

    Fractions of a second round up (a TTL is never shortened).
    """
    seconds: float
    if isinstance(value, bool) or value is None:
        raise InvalidArgument(field, f"{shown(value)} is not a duration", allowed=DURATION_HELP)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+", text):
            seconds = float(int(text))
        elif _WHOLE.fullmatch(text):
            seconds = float(sum(int(n) * _UNITS[u] for n, u in _PART.findall(text)))
        else:
            raise InvalidArgument(field, f"{shown(value)} is not a duration", allowed=DURATION_HELP)
    else:
        raise InvalidArgument(field, f"{kind_of(value)} is not a duration", allowed=DURATION_HELP)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(field, f"{shown(value)} must be longer than zero", allowed=DURATION_HELP)
    if seconds > MAX_DURATION_SECONDS:
        raise InvalidArgument(field, f"{shown(value)} is longer than 100 years", allowed=DURATION_HELP)
    return math.ceil(seconds)


def format_duration(seconds: float) -> str:
    """A short human form: ``45s``, ``12m``, ``3h20m``, ``2d4h`` (negative: ``-5m``)."""
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m" + (f"{s % 60}s" if s % 60 and s < 600 else "")
    if s < 86400:
        return f"{sign}{s // 3600}h" + (f"{(s % 3600) // 60}m" if (s % 3600) // 60 else "")
    return f"{sign}{s // 86400}d" + (f"{(s % 86400) // 3600}h" if (s % 86400) // 3600 else "")
