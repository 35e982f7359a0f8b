"""How values read in error messages, worded for a user of either SDK -- one rule for the
host (``mvm.errors`` re-exports these), the guest agent and (``sdks/typescript/src/shown.ts``)
the TypeScript SDK: ``null`` and ``true``/``false``, never Python's ``None``/``True``.
Stdlib only: shipped into guests with the rest of ``mvm.protocol``.
"""

from __future__ import annotations

from typing import Any


def shown(value: Any) -> str:
    """A value as error messages show it, worded for a user of either SDK (the TypeScript
    SDK's ``shown`` is the same rule): ``null``, ``true``/``false``, numbers, text in
    single quotes, lists and mappings item by item; anything else as its ``repr``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{shown(key)}: {shown(item)}" for key, item in value.items()) + "}"
    return repr(value)


def kind_of(value: Any) -> str:
    """What a value is, in words both SDKs use (``kindOf`` in TypeScript): null, boolean,
    number, string, bytes, list, object; else its class name."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
