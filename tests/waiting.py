"""Waiting on conditions instead of sleeping a guessed time (shared by tests/*).

Tests assert behaviour, never wall-clock times: they wait for the state they need
(bounded, so a regression fails instead of hanging) and then check it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60, interval: float = 0.05) -> None:
    """Until ``predicate()`` is true; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(interval)


def wait_stalled(progress: Callable[[], int], what: str, settle: float = 1.0, timeout: float = 60) -> int:
    """Until a sender has started and then stopped making progress (buffers and windows
    full): ``progress()`` is above 0 and unchanged for ``settle`` seconds. Returns it."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        value = progress()
        now = time.monotonic()
        if value != last:
            last, since = value, now
        elif value > 0 and now - since >= settle:
            return value
        assert now < deadline, f"{what}: never stalled (at {value})"
        time.sleep(0.05)
