"""Copied into the sandbox as /app/src/greeting.py by `include=["src"]`."""

GREETING = "hello from mvm"


def greet(name: str = "world") -> str:
    return f"{GREETING}, {name}"
