"""How a template build reports its phases.

* a caller-supplied ``progress(text)`` callback (the CLI's choice) gets each phase;
* otherwise, on a terminal (stderr is a TTY), a ``rich`` line with a spinner, the
  template, the current phase and the elapsed time;
* otherwise one plain line per phase on stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

ProgressCallback = Callable[[str], None]

#: mmdebstrap's "I: ..." lines, in the words a user would use. Unlisted ones are shown as they are.
_MMDEBSTRAP_PHASES = {
    "running apt-get update": "updating package lists",
    "downloading packages with apt": "downloading packages",
    "extracting archives": "extracting packages",
    "installing essential packages": "installing essential packages",
    "installing remaining packages inside the chroot": "installing packages",
    "cleaning package lists and apt cache": "cleaning apt caches",
}
_QUIET = ("chroot architecture", "finding correct signed-by", "skipping apt-get update", "running --setup-hook",
          "running --essential-hook", "running --customize-hook", "success in", "main() received signal")


def mmdebstrap_phase(line: str) -> str | None:
    """The phase an mmdebstrap output line announces, or None when it announces none."""
    if not line.startswith("I: "):
        return None
    text = line[3:].strip().rstrip(".").rstrip("…").strip()
    if text.startswith("running --setup-hook") and "merged-usr" in text:
        return "updating package lists"  # that hook runs apt-get update first
    if any(text.startswith(q) for q in _QUIET):
        return None
    if text.startswith("installing pip packages"):
        return "installing pip packages"
    return _MMDEBSTRAP_PHASES.get(text, text)


class BuildReporter:
    """A context manager that shows one build's phases; ``phase()`` moves it on."""

    def __init__(self, title: str, callback: ProgressCallback | None = None):
        self.title = title
        self.callback = callback
        self.started = time.monotonic()
        self._live: Any = None
        self._task: Any = None
        self._last: str | None = None

    def __enter__(self) -> BuildReporter:
        if self.callback is None and _stderr_is_tty():
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._live = Progress(
                SpinnerColumn(),
                TimeElapsedColumn(),  # before the texts, so a narrow terminal never cuts it off
                TextColumn("[bold]{task.description}"),
                TextColumn("[cyan]{task.fields[phase]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._live.start()
            self._task = self._live.add_task(self.title, total=None, phase="starting")
        else:
            self.phase("starting")
        return self

    def phase(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self._live is not None:
            self._live.update(self._task, phase=text)
        elif self.callback is not None:
            self.callback(f"{self.title}: {text}")
        else:
            print(f"mvm: {self.title}: {text} [{self.elapsed():.1f}s]", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def done(self, text: str) -> None:
        """The closing line, shown however the build was displayed."""
        if self._live is not None:
            self._live.stop()
            self._live = None
            from rich.console import Console

            Console(stderr=True).print(f"[green]✓[/] {text}")
        elif self.callback is not None:
            self.callback(text)
        else:
            print(f"mvm: {text}", file=sys.stderr, flush=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            message = f"{self.title}: failed after {self.elapsed():.1f}s"
            if self.callback is not None:
                self.callback(message)
            else:
                print(f"mvm: {message}", file=sys.stderr, flush=True)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
