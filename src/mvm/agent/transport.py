"""Where the host is: an inherited socket (``--fd``) or a virtio-serial port.

A *connector* hands out *sessions*; a session is one connection of the host
(``send_raw``/``recv``/``close``, like ``FramedChannel``).

* ``FdConnector``: exactly one session over the inherited fd; when it ends the
  agent ends.
* ``VirtioConnector``: the port stays open for the agent's whole life. While no
  host is connected ``read()`` returns EOF; the agent polls until a host is
  there, serves it, and waits for the next one when it goes (a supervisor
  reattaching, a VM restored from a snapshot). The port is non-blocking so a
  send to a host that went away is abandoned instead of completing, half a frame
  late, on the next connection.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Sequence

from ..protocol.channel import ChannelClosed, FramedChannel
from ..protocol.codec import Encoded, Frame, FrameDecoder

log = logging.getLogger("mvm.agent")

READ_SIZE = 1024 * 1024
#: How often the agent looks again for an absent host or port.
RETRY_SECONDS = 0.05
#: Bytes handed to the virtio port per write (the driver takes at most 32 KiB at once anyway).
WRITE_CHUNK = 64 * 1024


class FdSession:
    """The one connection over an inherited fd. Over a socketpair (the namespace backend:
    the host's kernel is ours) frames may carry descriptors to the host (``passes_fds``)."""

    def __init__(self, channel: FramedChannel):
        self._channel = channel
        self.passes_fds = channel.passes_fds

    def send_raw(self, encoded: Encoded, fds: Sequence[int] = ()) -> None:
        self._channel.send_raw(encoded, fds)

    def recv(self) -> Frame:
        return self._channel.recv()

    def close(self, *, broken: bool = False) -> None:
        self._channel.close()


class FdConnector:
    """``--fd N``: a connected stream socket (or any bidirectional fd) inherited from the backend."""

    reconnects = False

    def __init__(self, fd: int):
        self._fd = fd
        self._used = False

    def connect(self) -> FdSession | None:
        if self._used:
            return None
        self._used = True
        os.fstat(self._fd)  # EBADF now, with a clear message, rather than later
        os.set_inheritable(self._fd, False)
        try:
            sock = socket.socket(fileno=self._fd)
        except OSError as exc:
            if exc.errno != errno.ENOTSOCK:
                raise
            return FdSession(FramedChannel(read_fd=self._fd, write_fd=self._fd))
        return FdSession(FramedChannel(sock))

    def finished(self, session: FdSession) -> None:
        """Nothing to wait for: the agent ends with its only session."""


def find_virtio_port(name: str, sys_root: str = "/sys/class/virtio-ports", dev_root: str = "/dev") -> str:
    """The ``/dev/vportNpM`` whose ``name`` is ``name``; waits until it appears."""
    warned = False
    while True:
        device = lookup_virtio_port(name, sys_root, dev_root)
        if device is not None:
            return device
        if not warned:
            log.warning("waiting for the virtio-serial port named %r", name)
            warned = True
        time.sleep(RETRY_SECONDS * 4)


def lookup_virtio_port(name: str, sys_root: str = "/sys/class/virtio-ports", dev_root: str = "/dev") -> str | None:
    """The ``/dev/vportNpM`` whose ``name`` is ``name``, if there is one now."""
    for directory in sorted(glob.glob(os.path.join(sys_root, "*"))):
        try:
            with open(os.path.join(directory, "name")) as handle:
                if handle.read().strip() != name:
                    continue
        except OSError:
            continue
        device = os.path.join(dev_root, os.path.basename(directory))
        if not os.path.exists(device):
            _make_node(device, os.path.join(directory, "dev"))
        if os.path.exists(device):
            return device
    return None


def _make_node(device: str, dev_file: str) -> None:
    """Create the device node from sysfs's ``major:minor`` when no devtmpfs/udev made it."""
    try:
        with open(dev_file) as handle:
            major, minor = (int(part) for part in handle.read().strip().split(":"))
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
    except (OSError, ValueError) as exc:
        log.warning("cannot create %s: %s", device, exc)


class VirtioPort:
    """The open port: reads for the current session, writes abandoned when it ends."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        self.write_lock = threading.Lock()

    def read(self, timeout: float) -> bytes | None:
        """Bytes, ``b""`` when no host is connected, or None when nothing arrived in ``timeout``."""
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            pass
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.poll(int(timeout * 1000))
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None

    def wait_for_host(self) -> bytes:
        """Block until a host is connected; returns whatever it already sent."""
        warned_at = time.monotonic()
        while True:
            data = self.read(RETRY_SECONDS)
            if data is None:
                return b""  # connected, nothing sent yet
            if data:
                return data
            if time.monotonic() - warned_at > 60:
                log.info("still waiting for a host on %s", self.path)
                warned_at = time.monotonic()
            time.sleep(RETRY_SECONDS)

    def discard_until_disconnect(self) -> None:
        """After a protocol error: drop everything until the host goes away."""
        while self.read(1.0) != b"":
            pass


class VirtioSession:
    """One host connection on the port, between a connect and the EOF that ends it."""

    def __init__(self, port: VirtioPort, initial: bytes):
        self._port = port
        self._initial = initial
        self._decoder = FrameDecoder()
        self._pending: list[Frame] = []
        self.closed = False
        self.broken = False
        self.passes_fds = False  # a virtio port carries bytes only (and the host is another kernel)

    def recv(self) -> Frame:
        while not self._pending:
            if self.closed:
                raise ChannelClosed("host session is closed")
            if self._initial:
                chunk, self._initial = self._initial, b""
            else:
                read = self._port.read(1.0)
                if read is None:
                    continue
                chunk = read
            if not chunk:
                self.closed = True
                raise ChannelClosed("the host disconnected")
            self._pending.extend(self._decoder.feed(chunk))
        return self._pending.pop(0)

    def send_raw(self, encoded: Encoded, fds: Sequence[int] = ()) -> None:
        if fds:
            raise ValueError("a virtio port cannot pass descriptors")
        parts = [encoded] if isinstance(encoded, bytes) else encoded
        with self._port.write_lock:
            poller = select.poll()
            poller.register(self._port.fd, select.POLLOUT)
            for part in parts:
                self._write_all(poller, memoryview(part))

    def _write_all(self, poller: select.poll, view: memoryview) -> None:
        while view:
            if self.closed:
                raise ChannelClosed("host session is closed")
            try:
                written = os.write(self._port.fd, view[:WRITE_CHUNK])
            except BlockingIOError:
                events = poller.poll(100)
                if not events or any(mask & (select.POLLHUP | select.POLLERR) for _, mask in events):
                    time.sleep(RETRY_SECONDS / 5)  # no host right now: don't spin
                continue
            except OSError as exc:
                self.closed = True
                raise ChannelClosed(f"write to the virtio port failed: {exc}") from None
            view = view[written:]

    def close(self, *, broken: bool = False) -> None:
        self.closed = True
        self.broken = self.broken or broken


class VirtioConnector:
    """``--virtio-port NAME``: sessions for every host that connects, forever."""

    reconnects = True

    def __init__(self, name: str):
        self._name = name
        self._port: VirtioPort | None = None

    def connect(self) -> VirtioSession:
        while True:
            try:
                if self._port is None:
                    self._port = VirtioPort(find_virtio_port(self._name))
                    log.info("agent port %s opened", self._port.path)
                return VirtioSession(self._port, self._port.wait_for_host())
            except OSError as exc:
                log.warning("virtio port trouble (%s); reopening", exc)
                if self._port is not None:
                    try:
                        os.close(self._port.fd)
                    except OSError:
                        pass
                    self._port = None
                time.sleep(RETRY_SECONDS * 10)

    def finished(self, session: VirtioSession) -> None:
        """Called when a session ended; after a protocol error, wait out that host."""
        if session.broken and self._port is not None:
            try:
                self._port.discard_until_disconnect()
            except OSError as exc:
                log.warning("virtio port trouble while discarding (%s)", exc)
