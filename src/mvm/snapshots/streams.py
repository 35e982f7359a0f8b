"""Streamed sealing and unsealing through a helper process (:mod:`.seal_stream`).

Streams (a VM's memory image, which must never be a plain file): :meth:`SnapshotStore.begin`
gives a :class:`PendingSnapshot` whose :meth:`~PendingSnapshot.stream` sink is a shell
command (QEMU's ``exec:`` migration) sealing its stdin straight into the snapshot; and
:meth:`SnapshotStore.restoring` verifies everything else, then streams such a file back
through an unsealer command (``-incoming exec:``) reading the very descriptor that was
checked, which verifies it (every chunk, then the whole sha256) as it streams. The
helper process is :mod:`.seal_stream`; its key comes over a private control socket,
never a command line or an environment.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, SandboxError, SnapshotTampered
from ..osutil import process_stamp, stamp_alive
from . import seal_stream as _seal_stream_module
from .manifest import Manifest, SealedFile
from .seal_stream import SealInfo, recv_frame, send_frame

#: The helper process QEMU starts for a streamed (un)seal (see :mod:`.seal_stream`).
SEAL_STREAM_SCRIPT = Path(_seal_stream_module.__file__).resolve()
WAIT_TIMEOUT = 120.0


def _python() -> str:
    return sys.executable or "python3"


def _socket_parent() -> str:
    # A short parent: a Unix socket path must fit in 108 bytes, $MVM_HOME may be deep.
    return "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK | os.X_OK) else tempfile.gettempdir()


#: A control socket's directory: ``mvm-seal-<pid>-<start time>-<random>`` of the process
#: serving it, so a sweep can tell the directories whose process is gone.
_DIR_PREFIX = "mvm-seal-"


def _stream_dir() -> Path:
    """A fresh 0700 directory for one control socket, named after this process."""
    sweep_stale_stream_dirs()
    stamp = process_stamp().replace(" ", "-")
    return Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{stamp}-", dir=_socket_parent()))


def sweep_stale_stream_dirs() -> None:
    """Remove the control-socket directories whose process died without closing its
    stream (a supervisor SIGKILLed mid snapshot save or restore): done before each new
    stream and by ``mvm.gc()``. Only this user's, only of processes that are gone."""
    parent = _socket_parent()
    try:
        names = [name for name in os.listdir(parent) if name.startswith(_DIR_PREFIX)]
    except OSError:
        return
    for name in names:
        parts = name[len(_DIR_PREFIX):].split("-")
        if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            continue
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        if not stamp_alive(f"{parts[0]} {parts[1]}"):
            shutil.rmtree(path, ignore_errors=True)


class _StreamHelper:
    """Serves one ``seal_stream.py`` helper process on a private control socket.

    :meth:`command` is the shell command to run it (what QEMU gets after ``exec:``):
    only paths, nothing secret. The control socket lives in a fresh 0700 directory and
    only a peer of our own uid is answered; it receives the key, the AEAD context and
    one file descriptor (see :mod:`.seal_stream`), and its answer is what
    :meth:`_wait` returns. :meth:`close` (idempotent) ends everything and removes the
    directory; a helper still running then fails on its own (its peer is gone).
    """

    op = ""
    verb = ""

    def __init__(self, params: dict[str, Any], fd: int, label: str, *, connect_timeout: float = WAIT_TIMEOUT):
        self._params = params
        self._fd: int | None = fd
        self.label = label
        self._connect_timeout = connect_timeout
        self._dir: Path | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._reply: dict[str, Any] | None = None
        self._error = ""
        self._done = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.helper_pid: int | None = None

    def command(self) -> str:
        """``exec python -P …/seal_stream.py seal|unseal CONTROL_SOCKET`` (for ``sh -c``)."""
        with self._lock:
            if self._closing.is_set() or self._fd is None:
                raise InvalidArgument("stream", f"the {self.op} stream of {self.label} is already closed")
            if self._listener is None:
                self._listen()
        assert self._dir is not None
        return " ".join(["exec", shlex.quote(_python()), "-P", shlex.quote(str(SEAL_STREAM_SCRIPT)), self.op,
                         shlex.quote(str(self._dir / "ctl"))])

    def _listen(self) -> None:
        self._dir = _stream_dir()  # 0700
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self._dir / "ctl"))
            listener.listen(4)
            listener.settimeout(0.1)
        except BaseException:
            listener.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name=f"mvm-{self.op}-stream", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._listener is not None and self._fd is not None
        deadline = time.monotonic() + self._connect_timeout
        try:
            while True:
                if self._closing.is_set():
                    return
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    if time.monotonic() > deadline:
                        self._error = f"the helper process did not connect within {self._connect_timeout:.0f} s"
                        return
                    continue
                pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                     struct.calcsize("3i")))
                if uid != os.geteuid():
                    conn.close()
                    continue
                break
            self.helper_pid = pid
            self._listener.close()
            self._conn = conn
            conn.settimeout(None)
            send_frame(conn, {**self._params, "op": self.op, "label": self.label}, [self._fd])
            self._reply, _ = recv_frame(conn)  # when the helper is done (close() unblocks it)
        except (OSError, EOFError, ValueError) as exc:
            if not self._closing.is_set():
                self._error = f"the helper process ended without an answer ({exc})"
        finally:
            self._done.set()

    def _wait(self, timeout: float) -> dict[str, Any]:
        if self._thread is None:
            raise InvalidArgument("stream", f"the {self.op} stream of {self.label} was never started (command())")
        if not self._done.wait(timeout):
            raise SandboxError(f"{self.verb} {self.label}: no answer from the helper process within {timeout:.0f} s")
        if self._reply is None:
            raise SandboxError(f"{self.verb} {self.label} failed: {self._error or 'the helper process exited'}")
        return self._reply

    def close(self) -> None:
        with self._lock:
            self._closing.set()
            conn, listener, thread = self._conn, self._listener, self._thread
        for sock in (conn, listener):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if thread is not None:
            thread.join(5)
        for sock in (conn, listener):
            if sock is not None:
                sock.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> _StreamHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SealSink(_StreamHelper):
    """Where a backend streams a file it does not write itself (the VM's memory image):
    ``command()`` reads the stream on stdin and seals it straight into the pending
    snapshot's blob, so its plaintext never touches a disk. Made by
    :meth:`PendingSnapshot.stream`."""

    op = "seal"
    verb = "sealing"

    def __init__(self, blob_path: Path, blob: str, rel: str, key: bytes, context: bytes, chunk_size: int):
        fd = os.open(blob_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        super().__init__({"key": bytes(key).hex(), "context": context.hex(), "chunk_size": chunk_size}, fd, rel)
        self.rel = rel
        self.blob = blob
        self.info: SealInfo | None = None

    def finish(self, timeout: float = WAIT_TIMEOUT) -> int:
        """Wait until the whole stream is sealed and on disk; returns its plain size.
        :class:`SandboxError` if the sealer failed or died (then nothing is adopted)."""
        if self.info is None:
            reply = self._wait(timeout)
            if not reply.get("ok"):
                raise SandboxError(f"sealing {self.rel} failed: {reply.get('error')}")
            info = SealInfo(size=int(reply["size"]), sealed_size=int(reply["sealed_size"]),
                            sealed_sha256=str(reply["sealed_sha256"]), chunks=int(reply["chunks"]))
            assert self._fd is not None
            actual = os.fstat(self._fd).st_size
            if actual != info.sealed_size:
                raise SandboxError(f"sealing {self.rel}: the blob is {actual} bytes, the sealer wrote "
                                   f"{info.sealed_size}")
            self.info = info
            self.close()
        return self.info.size


class UnsealSource(_StreamHelper):
    """A blob streamed back as plaintext: ``command()`` writes it to stdout (QEMU's
    ``-incoming exec:``). Its helper authenticates each chunk before writing it and
    hashes the sealed bytes as they pass: the last chunk is written only if the whole
    blob's sha256 is the signed manifest's (see :mod:`.seal_stream`), so its reader
    never completes a stream of a modified or swapped blob. :meth:`finish` is the
    verdict; the caller uses what was read only once it returned. Made by
    :meth:`SnapshotStore.restoring`."""

    op = "unseal"
    verb = "unsealing"

    def __init__(self, fd: int, key: bytes, manifest: Manifest, sealed: SealedFile):
        super().__init__({"key": bytes(key).hex(), "context": manifest.context(sealed.path).hex(),
                          "sealed_sha256": sealed.sealed_sha256}, fd, f"{sealed.blob} ({sealed.path})")
        self.snapshot = manifest.id
        self.file = sealed

    def finish(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait for the unsealer's verdict: :class:`SnapshotTampered` if a chunk failed
        authentication, the blob's sha256 is not the manifest's or the size is not,
        :class:`SandboxError` if it failed otherwise (e.g. its reader went away)."""
        reply = self._wait(timeout)
        f = self.file
        if not reply.get("ok"):
            if reply.get("tampered"):
                raise SnapshotTampered(f"snapshot {self.snapshot}: {f.blob} ({f.path}): {reply.get('error')}",
                                       file=f.blob, path=f.path, snapshot=self.snapshot)
            raise SandboxError(f"unsealing {f.path} of snapshot {self.snapshot} failed: {reply.get('error')}")
        if int(reply.get("size", -1)) != f.size:
            raise SnapshotTampered(f"snapshot {self.snapshot}: {f.blob} ({f.path}): unsealed to "
                                   f"{reply.get('size')} bytes, the manifest says {f.size}", file=f.blob,
                                   path=f.path, snapshot=self.snapshot)
        self.close()
