"""The sandbox's network as its supervisor runs it: policy, port forwards, egress proxy.

Both directions of allowed traffic are opened over the agent channel: port
forwards are host-opened streams (odd ids, ``tcp.connect``), egress connections
are guest-opened ones (even ids, ``tcp.open`` from the agent's loopback
listener). Their bytes travel as TCP stream frames (``mvm.protocol.tcpmux``) --
or, where the agent hands the guest-side socket over (namespace backend:
``AgentLink.hands_off_sockets``), the supervisor relays the two sockets itself
(``relay.py``). In ``deny`` and ``allow`` mode the guest has no network interface
at all; ``open`` mode is the backends' business (QEMU user networking, pasta)
and only gets a resolver here.

Supervisor operations (docs/protocol.md; rows of ``ops.py``): ``port.forward``,
``port.list``, ``port.close``, ``network.update``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .. import errors
from ..osutil import write_json_atomic
from ..protocol.codec import STREAM_WINDOW, Frame
from ..protocol.requests import AGENT_USER
from ..protocol.tcpmux import StreamMux, id_counter
from ..spec import NetworkPolicy
from .egress import EGRESS_GUEST_PORT, PROXY_ENV, PROXY_URL, EgressPolicy, EgressProxy
from .ports import PortForwards
from .relay import Relays, adopt

if TYPE_CHECKING:
    from .server import Supervisor
    from .session import Reply, RequestContext

#: ``describe().network["relay"]``: the supervisor splices handed-over guest sockets, or
#: the agent relays the bytes as stream frames over its channel.
RELAY_SPLICE = "supervisor-splice"
RELAY_CHANNEL = "agent-channel"
#: In open mode, the guest's resolver (QEMU's slirp DNS; pasta forwards it to the host's resolver).
OPEN_MODE_RESOLVER = "10.0.2.3"


class NetworkManager:
    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.mux = StreamMux("mvm-sup-tcp", window=STREAM_WINDOW)
        self.relays = Relays()  # connections whose guest socket the agent handed over
        self.next_id = id_counter(1)  # host-opened streams are odd
        self.policy = EgressPolicy.from_config(sup.config.get("network") or {})
        self._lock = threading.Lock()
        self.forwards = PortForwards(self)
        self.egress = EgressProxy(self)
        self.egress_ready = False
        sup.agent.on_stream = self._on_frame
        sup.agent.on_change.append(self._on_channel_change)

    # ---- the agent channel ------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        if frame.kind == "event" and frame.header["event"] == "tcp.open":
            sock = None
            if frame.fds:  # the guest connection itself, handed over: only the proxy listener's
                try:
                    sock = adopt(frame.fds[0], local_port=EGRESS_GUEST_PORT)
                except errors.SandboxError as exc:
                    self.sup.logs.write("network", "system", f"egress connection refused: {exc.message}"[:1000])
                    return
            self.egress.on_open(int(frame.header["stream"]), int(frame.header["port"]),
                                str(frame.header.get("peer", "")), sock)
        else:
            self.mux.feed(frame)

    def _on_channel_change(self) -> None:
        self.mux.reset_all("the guest agent connection changed")
        self.relays.reset_all("the guest agent connection changed")

    def abort_stream(self, sid: int, reason: str) -> None:
        """Reset connection ``sid``, relayed here or over the channel."""
        if not self.relays.abort(sid, reason):
            self.mux.abort(sid, reason)

    def open_streams(self) -> int:
        """Relayed connections open now (forwards' and egress), both paths."""
        return self.mux.count() + self.relays.count()

    def agent_attached(self) -> None:
        """After every (re)connection to the agent (boot, start, restore): set the guest up
        for the current policy. A failure is logged: the guest then simply has no egress."""
        try:
            if self.policy.mode == "allow":
                self._enable_egress()
            elif self.policy.mode == "open":
                self._configure_resolver()
        except errors.MvmError as exc:
            self.sup.logs.system(f"network setup for mode {self.policy.mode} failed: {exc}")

    def _enable_egress(self) -> None:
        self.sup.agent.call("tcp.listen", {"port": EGRESS_GUEST_PORT, "host": "127.0.0.1",
                                           "handoff": self.sup.agent.hands_off_sockets}, timeout=15)
        self.sup.agent.call("agent.configure", {"env": dict(PROXY_ENV)}, timeout=15)
        self.egress_ready = True

    def _disable_egress(self) -> None:
        self.egress_ready = False
        self.sup.agent.call("agent.configure", {"env": {}}, timeout=15)
        self.sup.agent.call("tcp.unlisten", {"port": EGRESS_GUEST_PORT}, timeout=15)

    def _configure_resolver(self) -> None:
        """Open mode: point an empty (or missing) /etc/resolv.conf at the backend's DNS."""
        try:
            stat, _ = self.sup.agent.call("fs.stat", {"path": "/etc/resolv.conf", "user": AGENT_USER}, timeout=15)
            size = int(stat.get("size", 0))
        except errors.FileError:
            size = 0
        if size == 0:
            self.sup.agent.call("fs.write", {"path": "/etc/resolv.conf", "mode": 0o644, "make_parents": True,
                                             "user": AGENT_USER},
                                f"nameserver {OPEN_MODE_RESOLVER}\n".encode(), timeout=15)

    # ---- client operations ------------------------------------------------------------------

    def update(self, ctx: RequestContext) -> dict[str, Any]:
        args = ctx.args
        with self._lock:
            old = self.policy
            if old.mode == "open":
                raise errors.InvalidNetworkPolicy(
                    "network.mode", "this sandbox was created with mode='open' (a network interface); its "
                    "policy cannot be changed while it runs", allowed=["recreate the sandbox"])
            allow = args.get("allow")
            if allow is None:
                allow = list(old.allow)
            if not isinstance(allow, list):
                raise errors.InvalidNetworkPolicy("network.allow", "must be a list of 'host:port' strings")
            mode = args.get("mode") or ("allow" if allow else "deny")
            if mode not in ("allow", "deny"):
                raise errors.InvalidNetworkPolicy("network.mode", f"{mode!r} cannot be set on a running sandbox",
                                                  allowed=["allow", "deny"])
            wildcards = args.get("allow_wildcards")
            wildcards = old.allow_wildcards if wildcards is None else bool(wildcards)
            # InvalidNetworkPolicy names the entry
            policy = NetworkPolicy.validated(mode, allow, allow_wildcards=wildcards)
            new = EgressPolicy.from_config({"mode": policy.mode, "allow": list(policy.allow),
                                            "allow_wildcards": policy.allow_wildcards})
            self.policy = new
            with self.sup.state_lock:
                self.sup.config["network"] = new.to_wire()
                if self.sup.state not in ("destroyed",):
                    write_json_atomic(self.sup.directory / "state.json", self.sup.record())
        if self.sup.state == "running" and old.mode != new.mode:
            if new.mode == "allow":
                self._enable_egress()
            else:
                self._disable_egress()
        audit_id = self.sup.audit.record("network.update", new.to_wire(),
                                         details={"mode": new.mode, "allow": list(new.allow)[:50],
                                                  "previous_mode": old.mode})
        summary = ", ".join(new.allow) if new.allow else "nothing"
        self.sup.logs.write("network", "system", f"network policy updated: mode {new.mode}, egress allowed to "
                            f"{summary}"[:2000], audit_id, force=True)
        return {"network": self.describe(), "audit_id": audit_id}

    # ---- facts and the end --------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        # relay: who copies forwarded and egress bytes -- the supervisor, socket to socket
        # (splice; the agent handed the guest's socket over) or the agent, over its channel
        info: dict[str, Any] = {**self.policy.to_wire(), "forwards": self.forwards.list(),
                                "relay": RELAY_SPLICE if self.sup.agent.hands_off_sockets else RELAY_CHANNEL}
        if self.policy.mode == "allow":
            info["egress"] = {"proxy": PROXY_URL, "ready": self.egress_ready, "allowed": self.egress.allowed,
                              "refused": self.egress.refused}
        return info

    def close(self) -> None:
        """The sandbox ends: so do its forwards and streams."""
        self.forwards.close_all("the sandbox was destroyed")
        self.mux.close()
        self.relays.close()


# ---- the op table's handlers (supervisor/ops.py) -------------------------------------------


def port_forward(sup: Supervisor, ctx: RequestContext) -> Reply:
    return sup.network.forwards.open(ctx), b""


def port_list(sup: Supervisor, ctx: RequestContext) -> Reply:
    return {"forwards": sup.network.forwards.list()}, b""


def port_close(sup: Supervisor, ctx: RequestContext) -> Reply:
    return sup.network.forwards.close(ctx), b""


def network_update(sup: Supervisor, ctx: RequestContext) -> Reply:
    return sup.network.update(ctx), b""
