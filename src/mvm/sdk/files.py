"""``sandbox.files``: the guest filesystem. Bytes from the guest are untrusted:
every read is bounded by ``max_bytes``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import errors
from ..errors import kind_of, shown
from ..protocol import CHUNK_SIZE
from ..protocol.requests import DEFAULT_MAX_READ_BYTES, check_user
from ..supervisor.client_core import DataCallback, Request
from .models import FileEntry

if TYPE_CHECKING:
    from .sandbox import Sandbox


class Files:
    """Files in the sandbox. Reached as ``sandbox.files``; paths are absolute guest paths.

    Every operation takes ``user``: the guest account (name or uid) it acts as, with that
    user's permissions (a write creates files it owns); ``UserNotFound`` for one the guest
    does not have. Without it, operations act as commands do by default: as the template's
    image's ``User`` (an OCI image that sets one), else as root."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def write(
        self, path: str, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True, user: str | None = None
    ) -> FileEntry:
        """Write ``data`` to ``path`` atomically (parents created by default).

        >>> sandbox.files.write("/app/main.py", "print('hello from mvm')")
        """
        path = absolute_path(path)
        raw = payload_bytes(data, "data")
        begin = as_user({"path": path, "mode": mode, "make_parents": make_parents}, user)
        client = self._sandbox._client()
        if len(raw) <= CHUNK_SIZE:
            answer, _ = client.call("fs.write", {**begin, "append": False}, raw)
        else:
            result, _ = client.call("fs.write_begin", begin)
            handle = result["handle"]
            committed = False
            try:
                for window in chunk_windows(handle, raw):
                    client.call_many(window)
                answer, _ = client.call("fs.write_end", {"handle": handle, "commit": True})
                committed = True
            finally:
                if not committed:
                    try:
                        client.call("fs.write_end", {"handle": handle, "commit": False})
                    except errors.MvmError:
                        pass
        return written_entry(answer) or self.stat(path, user=user)

    def read(self, path: str, *, max_bytes: int = DEFAULT_MAX_READ_BYTES, user: str | None = None) -> bytes:
        """Read a whole file; raises ``TooLarge`` if it holds more than ``max_bytes``.

        >>> data = sandbox.files.read("/work/output.json")
        """
        into = io.BytesIO()
        request = read_request(path, max_bytes, user)
        self._sandbox._client().call(*request, on_data=gather_into(into))
        return into.getvalue()  # see read_request: the bytes are gathered in place

    def read_text(
        self, path: str, *, encoding: str = "utf-8", max_bytes: int = DEFAULT_MAX_READ_BYTES, user: str | None = None
    ) -> str:
        return self.read(path, max_bytes=max_bytes, user=user).decode(encoding, errors="replace")

    def list(self, path: str = "/", *, user: str | None = None) -> list[FileEntry]:
        """Entries of a directory, sorted by name."""
        result, _ = self._sandbox._client().call("fs.list", as_user({"path": absolute_path(path)}, user))
        return sorted((FileEntry.from_wire(e) for e in result.get("entries", [])), key=lambda e: e.name)

    def stat(self, path: str, *, user: str | None = None) -> FileEntry:
        result, _ = self._sandbox._client().call("fs.stat", as_user({"path": absolute_path(path)}, user))
        return FileEntry.from_wire(result)

    def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            self.stat(path, user=user)
            return True
        except errors.FileNotFoundInSandbox:
            return False

    def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755, user: str | None = None) -> None:
        args = as_user({"path": absolute_path(path), "parents": parents, "mode": mode}, user)
        self._sandbox._client().call("fs.mkdir", args)

    def remove(self, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        """Remove a file, or a directory (``recursive=True`` for a non-empty one)."""
        self._sandbox._client().call("fs.remove", as_user({"path": absolute_path(path), "recursive": recursive}, user))

    def move(self, src: str, dst: str, *, overwrite: bool = False, user: str | None = None) -> None:
        args = as_user({"src": absolute_path(src), "dst": absolute_path(dst), "overwrite": overwrite}, user)
        self._sandbox._client().call("fs.move", args)


#: Chunks of a large ``files.write`` in flight at once: a window is sent whole, then
#: acknowledged together (``Transport.call_many``), so the client's sends, the supervisor's
#: relaying and the agent's disk writes overlap instead of taking turns per chunk.
#: Memory bound: this many ``CHUNK_SIZE`` payloads queued per write (the supervisor serves
#: at most ``MAX_INFLIGHT`` requests per connection).
WRITE_WINDOW = 8


def chunk_windows(handle: Any, raw: bytes) -> Iterator[list[Request]]:
    """The ``fs.write_chunk`` requests of a large write, ``WRITE_WINDOW`` at a time; each
    names its ``offset``, as the agent may receive a window's chunks in any order."""
    view = memoryview(raw)  # slices are sent as they are, never copied
    starts = range(0, len(raw), CHUNK_SIZE)
    for first in range(0, len(starts), WRITE_WINDOW):
        yield [("fs.write_chunk", {"handle": handle, "offset": start}, view[start : start + CHUNK_SIZE])  # type: ignore[misc]
               for start in starts[first : first + WRITE_WINDOW]]


def check_max_bytes(max_bytes: int) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise errors.InvalidArgument("max_bytes", f"{shown(max_bytes)} must be a positive integer")


def read_request(path: str, max_bytes: int, user: str | None = None) -> tuple[str, dict[str, Any]]:
    """``fs.read``: the file comes back as ``data`` frames (stream ``file``), then
    ``{size, audit_id}``; the supervisor refuses a file over ``max_bytes`` (``TooLarge``).
    The SDK writes the frames into an ``io.BytesIO`` and returns its ``getvalue()``: the
    buffer grows in place and becomes the result without a copy, where joining a list of
    chunks touched every byte of a big file once more (in fresh memory)."""
    path = absolute_path(path)
    check_max_bytes(max_bytes)
    return "fs.read", as_user({"path": path, "max_bytes": max_bytes}, user)


def gather_into(into: io.BytesIO) -> DataCallback:
    """``on_data`` for a read: each ``data`` frame written into ``into``."""
    def gather(_stream: str, data: bytes) -> None:
        into.write(data)
    return gather


def as_user(args: dict[str, Any], user: str | None) -> dict[str, Any]:
    """A file operation's arguments, acting as ``user`` when one is given (checked as
    ``commands.run``'s: :func:`mvm.protocol.requests.check_user`)."""
    check_user(user)
    return args if user is None else {**args, "user": user}


def payload_bytes(data: Any, field: str) -> bytes:
    """Bytes to send: ``bytes``-like as is, ``str`` as UTF-8; anything else (an ``int``
    would become that many NULs) is refused naming ``field``."""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise errors.InvalidArgument(field, f"{kind_of(data)} is not bytes or str")


def written_entry(answer: dict[str, Any]) -> FileEntry | None:
    """The entry a write's answer carries (a recording's does: it has nothing to stat)."""
    return FileEntry.from_wire(answer["entry"]) if "entry" in answer else None


def absolute_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise errors.InvalidArgument("path", f"{shown(path)} must be an absolute guest path",
                                     allowed="e.g. '/app/main.py'")
    return path
