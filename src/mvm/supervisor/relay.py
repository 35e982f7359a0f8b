"""Socket-to-socket relays in the supervisor: the kernel copies the bytes.

On a backend whose guest agent shares this host's kernel (namespace: the agent is
reached over a socketpair) the agent hands the guest end of a port forward's or an
egress connection to the supervisor as a descriptor (``tcp.connect`` / ``tcp.listen``
with ``handoff``; SCM_RIGHTS). ``adopt`` checks what came -- a TCP socket between two
loopback addresses of the sandbox, at the port that was asked for, nothing else --
and ``Relays`` relays it to the host end: one thread per direction, ``splice(2)``
through a pipe, so no relayed byte enters Python, the agent, or the agent channel.
Without a pipe (the user is out of pipe space, or the process has one descriptor left)
the same loop copies through one buffer instead. The sockets are non-blocking and every
wait is a ``poll`` that also watches the relay's eventfd, which is how ``abort`` wakes a
direction wherever it waits; a connection with no descriptor left for that eventfd is
refused (reset).

Semantics are the stream mux's (docs/protocol.md, TCP streams): an EOF one way
shuts down the write side of the other socket (half-close) and the other
direction goes on; a reset or a failed write resets both ends; ``abort`` resets
both, and nothing else is sent first: a peer of an aborted relay reads a reset,
never a clean EOF. Who may get a socket and why: docs/security.md (port forwards and egress).
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable

from .. import errors
from ..protocol.tcpmux import DEFAULT_MAX_STREAMS, StreamClosed, arm_reset

#: Bytes one splice moves at most, and the pipe size asked for (the default 64 KiB pipe
#: costs more system calls per MiB; when the user's pipe budget is spent it is what we get).
CHUNK = 1 << 20
#: Buffer of the copying loop (no pipe available).
COPY_CHUNK = 256 * 1024


def _load_thread_unwinder() -> None:
    """A thread still blocked in a relay when the interpreter exits is ended by
    pthread_exit, which unwinds through libgcc_s -- a library glibc opens only then. If
    the process is out of descriptors at that moment (exactly when the copying fallback
    runs), the open fails and glibc aborts the process ("libgcc_s.so.1 must be installed
    for pthread_exit to work"): the supervisor would die by SIGABRT instead of exiting.
    Loaded now, glibc finds it already in the process and needs no descriptor then."""
    try:
        ctypes.CDLL("libgcc_s.so.1")
    except OSError:  # not there (a static or musl build): nothing to preload
        pass


_load_thread_unwinder()

OnDone = Callable[["Relay"], None]


def adopt(fd: int, *, local_port: int | None = None, peer_port: int | None = None) -> socket.socket:
    """Take a descriptor the agent handed over, if it is what was asked for: a connected TCP
    socket whose two ends are loopback addresses (of the sandbox's network namespace), with
    ``local_port`` (an egress connection accepted on the proxy's listener) or ``peer_port``
    (a forward's connection to the guest port) as asked. Anything else is closed and refused
    with ``SandboxError``; the socket returned is in blocking mode."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ValueError("not a socket")
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError) as exc:
        _close_fd(fd)
        raise errors.SandboxError(f"the guest agent handed over a descriptor that is not a connection: {exc}") from None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM \
                or sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_TCP:
            raise ValueError(f"not a TCP socket ({sock.family!r}, {sock.type!r})")
        for end, address, port in (("local", sock.getsockname(), local_port), ("peer", sock.getpeername(), peer_port)):
            if not _is_loopback(address[0]) or (port is not None and address[1] != port):
                raise ValueError(f"its {end} end is {address[0]}:{address[1]}, not the sandbox's loopback"
                                 + (f" port {port}" if port is not None else ""))
        sock.setblocking(True)
        return sock
    except (OSError, ValueError) as exc:
        sock.close()
        raise errors.SandboxError(f"the guest agent handed over the wrong connection: {exc}") from None


class Relay:
    """One relayed connection: ``host`` (the forward's client, the egress upstream) and
    ``guest`` (the handed-over socket). Counters grow as bytes are written."""

    def __init__(self, rid: int, host: socket.socket, guest: socket.socket, on_done: OnDone, host_prefix: bytes,
                 wake: int):
        self.id = rid
        self.host = host
        self.guest = guest
        self.bytes_in = 0  # host -> guest
        self.bytes_out = 0  # guest -> host
        self.reason = ""
        self.aborted = False
        self._on_done = on_done
        self._host_prefix = host_prefix
        self._wake = wake  # an eventfd, readable once the relay is aborted
        self._lock = threading.Lock()
        self._running = 2
        for sock in (host, guest):
            sock.setblocking(False)  # every wait is a poll that an abort can end (``_wait``)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass

    def start(self) -> None:
        for src, dst, inbound in ((self.host, self.guest, True), (self.guest, self.host, False)):
            threading.Thread(target=self._direction, args=(src, dst, inbound), daemon=True,
                             name="mvm-relay-in" if inbound else "mvm-relay-out").start()

    def abort(self, reason: str) -> None:
        """Reset both ends: each direction wakes from its wait (the wake eventfd), and the
        last one closes both sockets with ``SO_LINGER`` 0. No end is shut down first: a
        FIN sent before the RST would show the far end a clean close instead of a reset."""
        with self._lock:  # (the sockets are closed under it once both directions are done)
            if self.aborted or self._running == 0:
                return
            self.aborted = True
            self.reason = reason
            arm_reset(self.host)
            arm_reset(self.guest)
            os.eventfd_write(self._wake, 1)

    # ---- the two directions ---------------------------------------------------------------------

    def _direction(self, src: socket.socket, dst: socket.socket, inbound: bool) -> None:
        readable, writable = select.poll(), select.poll()
        readable.register(src, select.POLLIN)
        writable.register(dst, select.POLLOUT)
        for poller in (readable, writable):
            poller.register(self._wake, select.POLLIN)
        try:
            if not inbound and self._host_prefix:
                self._write(dst, self._host_prefix, inbound, writable)
            try:
                pipe = os.pipe2(os.O_CLOEXEC)
            except OSError:  # no descriptors or pipe space left: copy through a buffer
                self._copy(src, dst, inbound, readable, writable)
            else:
                try:
                    self._splice(src, dst, inbound, pipe, readable, writable)
                finally:
                    os.close(pipe[0])
                    os.close(pipe[1])
            with self._lock:  # (not after an abort: no FIN may go before its RST)
                if not self.aborted:
                    dst.shutdown(socket.SHUT_WR)  # its EOF, passed on: the other direction goes on
        except _Aborted:
            pass
        except OSError as exc:
            self.abort(f"connection failed: {exc.strerror or exc}")
        finally:
            self._finished()

    def _wait(self, poller: select.poll) -> None:
        """Until the socket ``poller`` watches is ready (or failed: the retried call says
        how); raises ``_Aborted`` once the relay is aborted."""
        if not self.aborted:
            poller.poll()
        if self.aborted:
            raise _Aborted

    def _splice(self, src: socket.socket, dst: socket.socket, inbound: bool, pipe: tuple[int, int],
                readable: select.poll, writable: select.poll) -> None:
        read_end, write_end = pipe
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass  # the user's pipe budget is spent: the default size works too
        source, sink = src.fileno(), dst.fileno()
        while True:
            try:
                moved = os.splice(source, write_end, CHUNK)
            except BlockingIOError:
                self._wait(readable)
                continue
            if not moved:
                return
            while moved:
                if self.aborted:
                    raise _Aborted
                try:
                    written = os.splice(read_end, sink, moved)
                except BlockingIOError:
                    self._wait(writable)
                    continue
                moved -= written
                self._count(inbound, written)

    def _copy(self, src: socket.socket, dst: socket.socket, inbound: bool,
              readable: select.poll, writable: select.poll) -> None:
        buffer = bytearray(COPY_CHUNK)
        view = memoryview(buffer)
        while True:
            try:
                got = src.recv_into(buffer)
            except BlockingIOError:
                self._wait(readable)
                continue
            if not got:
                return
            self._write(dst, view[:got], inbound, writable)

    def _write(self, dst: socket.socket, data: bytes | memoryview, inbound: bool, writable: select.poll) -> None:
        view = memoryview(data)
        while view:
            if self.aborted:
                raise _Aborted
            try:
                sent = dst.send(view)
            except BlockingIOError:
                self._wait(writable)
                continue
            view = view[sent:]
            self._count(inbound, sent)

    def _count(self, inbound: bool, count: int) -> None:
        if inbound:
            self.bytes_in += count
        else:
            self.bytes_out += count

    def _finished(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running:
                return
            for sock in (self.host, self.guest):
                sock.close()  # (after an abort: SO_LINGER 0, a reset)
            os.close(self._wake)
        try:
            self._on_done(self)
        except Exception:  # an owner's bookkeeping must not take the thread's error elsewhere
            pass


class _Aborted(Exception):
    """A relay direction's way out once its relay is aborted."""


class Relays:
    """The relays of one sandbox, by id (the stream id the connection would have had)."""

    def __init__(self, max_relays: int = DEFAULT_MAX_STREAMS):
        self.max_relays = max_relays
        self._lock = threading.Lock()
        self._relays: dict[int, Relay] = {}
        self._closed = False

    def start(self, rid: int, host: socket.socket, guest: socket.socket, *, host_prefix: bytes = b"",
              on_done: OnDone | None = None) -> Relay:
        """Relay ``host`` <-> ``guest`` (``host_prefix`` is written to ``host`` first); the
        relay owns both sockets from here on, also when this raises ``StreamClosed`` (too
        many relays, or closed: they are reset then)."""
        def done(relay: Relay) -> None:
            with self._lock:
                self._relays.pop(relay.id, None)
            if on_done is not None:
                on_done(relay)

        with self._lock:
            refused = ("the relays are closed" if self._closed else
                       f"{self.max_relays} relayed connections are already open"
                       if len(self._relays) >= self.max_relays else
                       f"connection {rid} is already relayed" if rid in self._relays else None)
            if refused is None:
                try:
                    wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                except OSError as exc:
                    refused = f"no descriptor is left to relay connection {rid}: {exc.strerror or exc}"
                else:
                    relay = Relay(rid, host, guest, done, host_prefix, wake)
                    self._relays[rid] = relay
        if refused is not None:
            reset(host)
            reset(guest)
            raise StreamClosed(refused)
        relay.start()
        return relay

    def abort(self, rid: int, reason: str) -> bool:
        with self._lock:
            relay = self._relays.get(rid)
        if relay is None:
            return False
        relay.abort(reason)
        return True

    def reset_all(self, reason: str) -> int:
        with self._lock:
            relays = list(self._relays.values())
        for relay in relays:
            relay.abort(reason)
        return len(relays)

    def count(self) -> int:
        with self._lock:
            return len(self._relays)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.reset_all("closing")


class GuestConnection:
    """A handed-over guest connection read and answered by one handler thread (the egress
    proxy reading a request head) until ``attach`` relays it: ``PendingStream``'s twin."""

    def __init__(self, relays: Relays, rid: int, sock: socket.socket):
        self.id = rid
        self.sock = sock
        self._relays = relays

    def recv(self, max_bytes: int, timeout: float) -> bytes:
        """Up to ``max_bytes``; ``b""`` at the guest's EOF. Raises ``TimeoutError`` or
        ``StreamClosed``."""
        try:
            self.sock.settimeout(max(timeout, 0.001))
            return self.sock.recv(max_bytes)
        except TimeoutError:
            raise
        except OSError as exc:
            raise StreamClosed(f"connection failed: {exc.strerror or exc}") from None

    def send(self, data: bytes, *, eof: bool = False, timeout: float = 10.0) -> None:
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
            if eof:
                self.sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            raise
        except OSError as exc:
            raise StreamClosed(f"connection failed: {exc.strerror or exc}") from None

    def attach(self, upstream: socket.socket, prefix: bytes = b"") -> None:
        """Relay the connection to ``upstream`` (``prefix`` written to it first)."""
        self._relays.start(self.id, upstream, self.sock, host_prefix=prefix)

    def finish(self, timeout: float = 5.0) -> None:
        """After our EOF: discard what the guest still sends until its EOF, then close
        (reset it if it does not finish within ``timeout``)."""
        deadline = time.monotonic() + timeout
        try:
            while self.recv(COPY_CHUNK, deadline - time.monotonic()):
                pass
        except (TimeoutError, StreamClosed):
            self.abort("the guest did not finish")
            return
        self.sock.close()

    def abort(self, reason: str) -> None:
        reset(self.sock)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a RST."""
    arm_reset(sock)
    sock.close()


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
