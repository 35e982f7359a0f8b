"""The per-sandbox supervisor: owns the backend instance, the agent link, TTL, logs, audit.

It is started detached by ``launch.spawn_supervisor`` and serves clients on
``control.sock`` with the protocol of docs/protocol.md: ``session.py`` reads the
requests, ``ops.py`` (the op table) picks each one's handler (``process_ops.py``,
``sandbox_ops.py``, ``network.py``, or the agent for forwarded guest operations).
This module is the sandbox itself: boot, lifecycle state, agent events, end of life.
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
import shutil
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import errors
from ..agent import MAX_AGENT_RESTARTS
from ..backends import get_backend
from ..backends.base import BackendInstance, SandboxSpec
from ..pooling import member as pooling
from ..osutil import DeferredSync, write_json_atomic
from ..paths import receipts_dir, runs_dir, templates_dir
from ..protocol.codec import Frame
from ..security.audit import current_actor
from ..security.secrets import Redactor
from ..spec import SandboxConfig
from ..templates import TemplateHold, hold_template
from ..templates.builder import hold_build
from . import ops
from .idle import IdleWatch
from .agent_link import AgentLink, AgentReplaced
from .audit import Auditor
from .logbook import LogBook
from .network import NetworkManager
from .processes import OutputWindows, ProcessTable
from .session import ClientSession, Reply, RequestContext, with_principal
from .state import CONTROL_SOCKET, retire_directory, write_supervisor_stamp


class Supervisor:
    def __init__(self, directory: Path, config: dict[str, Any], secret_env: dict[str, str]):
        self.directory = directory
        self.config = config
        self.sandbox_id: str = config["id"]
        self.secret_env = secret_env  # env key -> value; in memory only
        #: What the agent said of the limits it enforces itself (a VM's max_processes), for describe().
        self.guest_limits: dict[str, Any] = {}
        self.state = "creating"
        self.state_lock = threading.RLock()
        self.created_at = float(config.get("created_at") or time.time())
        ttl = config.get("ttl_seconds")
        self.expires_at: float | None = self.created_at + float(ttl) if ttl else None
        self.error: str | None = None
        #: How many times the guest agent died and was started again (describe().details).
        self.agent_restarts = 0
        #: Held while a guest's agent is attached and configured (boot, start, restore) and
        #: while a dead agent is reconnected (``_on_agent_gone``): one at a time (``attach_agent``).
        self._agent_attach = threading.Lock()
        # secret name -> value (memory only), for redaction as [redacted:NAME]
        names = config.get("secret_env_names") or {}
        self.secrets: dict[str, str] = {names.get(k, k): v for k, v in secret_env.items()}
        self.redactor = Redactor(self.secrets)
        self.logs = LogBook(directory / "logs.jsonl", redact=self._redact)
        self.audit = Auditor(self.sandbox_id, self.logs)
        self.processes = ProcessTable()
        self.receipt_sync = DeferredSync("mvm-receipt-sync")
        self.receipts_dir = receipts_dir()  # made once, not per exec.run
        self.backend = get_backend(config["backend"])
        self.agent = AgentLink(on_event=self._on_agent_event, on_lost=self._on_agent_lost,
                               receive_fds=self.backend.agent_shares_kernel)
        self.output_windows = OutputWindows(self.agent.send, lambda: self.agent.generation)  # output credit
        self.processes.on_window = self.output_windows.grant
        self.agent.on_change.append(self._on_agent_channel_change)
        self.instance: BackendInstance | None = None
        self.template_digest: str | None = None
        #: The template held in use for the sandbox's life: no prune in any process removes it.
        self.template_hold: TemplateHold | None = None
        self.boot_ms: dict[str, float] = {}
        self._phase_start = time.perf_counter()
        # Every backend call runs on this one long-lived thread: children started with
        # PR_SET_PDEATHSIG (bwrap --die-with-parent, QEMU) die when the *thread* that
        # spawned them exits, so they must never be spawned from a request thread.
        self._backend_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mvm-backend")
        self.listener: socket.socket | None = None
        self._stop_serving = threading.Event()
        self.destroyed = threading.Event()
        self.network = NetworkManager(self)  # port forwards, egress proxy (TCP streams over the agent link)
        self.idle = IdleWatch(self, config.get("auto_pause_seconds"))
        # Pre-started for a warm pool: waits in state "pooled" until a create claims it.
        self.pool = pooling.Membership(config["pool"], self.created_at) if config.get("pool") else None

    # ---- boot ---------------------------------------------------------------

    def _mark(self, phase: str) -> None:
        """Record how long each boot phase took (``describe().details["boot_ms"]``)."""
        now = time.perf_counter()
        self.boot_ms[phase] = round((now - self._phase_start) * 1000, 1)
        self._phase_start = now

    def boot(self) -> None:
        config = SandboxConfig.from_json(self.config)  # the trust boundary: checked here, whoever wrote it
        self.template_hold = resolved_template(config)
        template = self.template_hold.image
        self.template_digest = template.digest
        self._mark("template")
        spec = SandboxSpec(
            sandbox_id=self.sandbox_id,
            template=template,
            resources=config.resources,
            network=config.network,
            state_dir=self.directory,
        )
        spec.backend_dir.mkdir(exist_ok=True)
        self.instance = self.on_backend(self.backend.create, spec)
        self.instance.watch_agent(self._on_agent_gone)
        self._mark("backend_create")
        snapshot_id = self.config.get("from_snapshot")
        if snapshot_id:
            self.restore_from(snapshot_id)
        else:
            sock = self.on_backend(self.instance.start)
            self._mark("backend_start")
            self.attach_agent(sock, on_hello=lambda: self._mark("agent_hello"))
        self._mark("agent_configure")
        self._check_guest_survived_create()
        if self.pool is not None:
            pooling.prestarted(self, self.pool)
            self._mark("audit")
            return
        # Made by whoever spawned us; a creator acting for someone (mvmctl mcp) names them.
        creator = with_principal(current_actor(), config.on_behalf_of) if config.on_behalf_of else None
        audit_id = self.audit.record("sandbox.create", {"template": self.config["template"],
                                                        "backend": self.config["backend"]}, actor=creator)
        self._mark("audit")
        self.logs.system(f"sandbox created from template {self.config['template']} on backend "
                         f"{self.config['backend']}", audit_id)
        with self.state_lock:  # an agent lost from here on finds the sandbox running: it says error
            self._check_guest_survived_create()
            self.set_state("running")

    def _check_guest_survived_create(self) -> None:
        """A guest that died while the sandbox was being created (its agent's channel
        closed, or its host processes gone: QEMU, bwrap) fails the create, rather than
        being reported ready as ``running`` with nothing behind it. Asked of the host, not
        left to the agent reader's thread, which may not have seen the end yet."""
        if not self.agent.attached or self.instance is None or not self.instance.host_pids():
            raise errors.SandboxError("the guest ended while the sandbox was being created "
                                      f"({self.config['backend']} backend); see the sandbox log")

    def on_backend(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the backend thread and return its result."""
        return self._backend_thread.submit(fn, *args).result()

    def _redact(self, text: str) -> str:
        """Mask every secret value this supervisor has handled (log lines, outputs)."""
        return self.redactor.redact(text)

    def learn_secrets(self, names: dict[str, str], env: dict[str, str]) -> None:
        fresh = {name: env[key] for key, name in names.items() if key in env}
        if any(self.secrets.get(n) != v for n, v in fresh.items()):
            self.secrets.update(fresh)
            self.redactor = Redactor(self.secrets)

    def attach_agent(self, sock: socket.socket, *, on_hello: Callable[[], None] | None = None) -> None:
        """Take the guest agent on ``sock`` (hello both ways) and configure it. An agent that
        dies meanwhile (a restored guest's, say) is restarted only once this is over: the
        restart closes this socket, so this fails at once naming the restart, and then
        connects anew. Side by side, the two would share the guest's one agent port, which
        QEMU gives one connection at a time: the new agent answered on this socket, the
        restart's hello on its own waited in vain, and its failure ended the calls made since
        (``test_an_agent_killed_mid_write_save_or_restore_is_restarted[restore-vm]``)."""
        with self._agent_attach:
            self.agent.attach(sock)
            if on_hello is not None:
                on_hello()
            self.configure_agent()

    def configure_agent(self) -> None:
        """Send ``agent.configure`` to the agent just attached (only to that one: one that died
        meanwhile fails this at once instead of it waiting for its successor)."""
        limits = self.instance.agent_limits() if self.instance is not None else {}
        try:
            result, _ = self.agent.call("agent.configure", {
                "clock_epoch": time.time(),
                "entropy_hex": _secrets.token_hex(32),
                "hostname": "sandbox",
                **limits,
            }, timeout=15, generation=self.agent.generation)
        except AgentReplaced:
            raise errors.SandboxError("the guest agent was replaced during agent.configure",
                                      agent_restart=True) from None
        self.guest_limits = {name: result.get(name, "not enforced: the agent did not say") for name in limits}
        for name, outcome in self.guest_limits.items():
            if str(outcome).startswith("not enforced"):
                self.logs.system(f"{name} is {outcome}")
        self.network.agent_attached()

    def restore_from(self, snapshot_id: str, *, replace_running: bool = False) -> None:
        """Restore the instance from a snapshot; with ``replace_running`` the running guest
        is stopped first, but only once the snapshot was found (an unknown one changes nothing)."""
        from .. import snapshots

        instance = self.instance
        assert instance is not None

        def stop_running() -> None:
            self.agent.detach()
            # Before the restored guest starts: its agent may die and be restarted (attached
            # by the keeper's thread) before this restore's own attach, and its processes
            # must not be taken for the old guest's.
            self.processes.new_boot(self.agent.next_generation)
            self.on_backend(instance.stop)

        # Verified whole first; a VM's memory image then streams through the unsealer.
        # (A create from a snapshot has no old guest and no process records to forget.)
        sock, info = snapshots.restore(instance, snapshots.SnapshotStore(), snapshot_id, run=self.on_backend,
                                       replacing=stop_running if replace_running else None)
        if replace_running:  # (from paused too) the restored guest runs: its agent's death is a restart
            self.set_state("running")
        self.attach_agent(sock)
        self.audit.record("snapshot.restore", {"snapshot": info.id, "name": info.name})

    def listen(self) -> None:
        path = self.directory / CONTROL_SOCKET
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(64)
        self.listener = listener

    def serve_forever(self) -> None:
        assert self.listener is not None
        threading.Thread(target=self._ttl_watch, name="mvm-ttl", daemon=True).start()
        threading.Thread(target=self.idle.watch, name="mvm-idle", daemon=True).start()
        self.listener.settimeout(0.5)
        while not self._stop_serving.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(None)
            try:
                ClientSession.accept(self, conn)
            except RuntimeError:  # no thread for it now: that connection fails, the supervisor goes on
                continue

    # ---- state --------------------------------------------------------------

    def set_state(self, state: str, error: str | None = None) -> None:
        with self.state_lock:
            self.state = state
            if error:
                self.error = error
            if state != "destroyed":
                write_json_atomic(self.directory / "state.json", self.record())

    def record(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.config.items() if k != "secret_env"},
            "secret_env_keys": sorted(self.secret_env),
            "state": self.state,
            "supervisor_pid": os.getpid(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "error": self.error,
        }

    def describe(self) -> dict[str, Any]:
        details = self.instance.describe() if self.instance else {}
        return {
            "id": self.sandbox_id,
            "name": self.config["name"],
            "state": self.state,
            "template": self.config["template"],
            "backend": self.config["backend"],
            "isolation": details.get("isolation", self.backend.isolation),
            "resources": self.config["resources"],
            "network": self.network.describe(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "workload_id": self.config.get("workload_id"),
            "details": {**details, "boot_ms": self.boot_ms, "error": self.error,
                        "host_pids": self.instance.host_pids() if self.instance else [], "supervisor_pid": os.getpid(),
                        "env_keys": sorted(self.config.get("env", {})), "secret_env_keys": sorted(self.secret_env),
                        "agent": self.agent.agent_hello, "agent_restarts": self.agent_restarts,
                        "guest_limits": self.guest_limits,
                        **self.idle.describe(),
                        "pool": self.pool.describe() if self.pool is not None else None},
        }

    def require_state(self, op: str, *allowed: str, auto_resume: bool = False) -> None:
        with self.state_lock:
            state = self.state
        if state in allowed:
            return
        if state == "paused" and "running" in allowed:
            if auto_resume:
                self.resume_instance()
                return
            raise errors.SandboxPaused(f"{op}: sandbox {self.config['name']} is paused; resume it first "
                                       f"(or pass auto_resume=True)", state=state)
        raise errors.InvalidState(f"{op}: not allowed while the sandbox is {state} (allowed in: {', '.join(allowed)})",
                                  state=state, allowed=list(allowed))

    # ---- dispatch -----------------------------------------------------------

    def handle(self, ctx: RequestContext) -> Reply:
        with self.idle.request(ctx.op):
            return ops.dispatch(self, ctx)

    def resume_instance(self) -> None:
        assert self.instance is not None
        self.on_backend(self.instance.resume)
        self.set_state("running")
        try:  # the guest clock stood still while paused
            self.agent.call("agent.configure", {"clock_epoch": time.time()}, timeout=15)
        except errors.MvmError:
            pass

    def sync_guest(self) -> None:
        """Flush guest writes to the disk layer, so a stop or snapshot loses nothing."""
        try:
            self.agent.call("fs.sync", {}, timeout=30)
        except errors.MvmError as exc:
            self.logs.system(f"guest sync failed: {exc}")

    # ---- agent events -------------------------------------------------------

    def _on_agent_event(self, frame: Frame, generation: int) -> None:
        name = frame.header["event"]
        if name == "proc.output":
            pid = int(frame.header["pid"])
            stream = str(frame.header.get("stream", "stdout"))
            self.processes.output(generation, pid, stream, frame.payload)
            self.logs.process_output(pid, stream, frame.payload)
        elif name == "proc.exit":
            pid = int(frame.header["pid"])
            self.logs.process_exit(pid)
            self.processes.exit(generation, pid, int(frame.header.get("exit_code", -1)), frame.header.get("signal"),
                                frame.header.get("ended_at"))

    def _on_agent_channel_change(self) -> None:
        """A new agent connection starts every process's output credit afresh (both ends)."""
        self.output_windows.reset()
        self.processes.reset_windows()

    def _on_agent_lost(self, reason: str) -> None:
        with self.state_lock:  # (a create going running checks the link under this lock)
            if self.state not in ("running", "paused") or self.destroyed.is_set():
                return
            self.set_state("error", error=reason)
        self.logs.system(f"guest agent lost: {reason}")
        self.processes.mark_all_lost(f"the guest agent was lost ({reason})")

    def _on_agent_gone(self) -> None:
        """The guest agent died and the guest's init starts a new one (VM): the calls in
        flight fail naming the restart, the processes it ran are reported ended (init
        ended them), and the new agent is reached on a fresh connection -- a clean stream,
        so nothing the dead agent half-wrote can be read as the new one's. Files stay. An
        agent that dies more than ``MAX_AGENT_RESTARTS`` times ends the sandbox."""
        with self.state_lock:
            if self.state != "running" or self.destroyed.is_set() or self.instance is None:
                return
            restart = self.agent_restarts + 1
        if restart > MAX_AGENT_RESTARTS:
            reason = f"the guest agent died {restart} times (it is restarted at most {MAX_AGENT_RESTARTS} times)"
            self.agent.begin_restart(reason)
            self.agent_restarts = restart
            self.agent.detach()
            self._on_agent_lost(reason)
            return
        why = f"the guest agent died and was restarted (restart {restart} of at most {MAX_AGENT_RESTARTS})"
        started = time.monotonic()
        # The dead agent's channel is closed, and so is that of an attach under way (a
        # restore's, say: it fails at once); counted after, so a call made once the count
        # shows waits for the new agent instead of going to the dead one.
        generation = self.agent.begin_restart(why)
        with self._agent_attach:  # (once that attach has given up: see attach_agent)
            self.agent_restarts = restart
            self.processes.agent_gone(generation, why)
            self.logs.system(f"{why}; reconnecting")
            try:
                self.agent.attach(self.instance.reconnect_agent())
                self.configure_agent()
            except errors.MvmError as exc:
                self.agent.detach()
                self.audit.record("agent.restart", {"restart": restart}, outcome="error", error_type=exc.wire_type,
                                  details={"error": exc.message})
                self._on_agent_lost(f"{why}, but the new agent did not answer: {exc.message}")
                return
        self.audit.record("agent.restart", {"restart": restart},
                          details={"reconnect_ms": round((time.monotonic() - started) * 1000, 1),
                                   "agent_pid": self.agent.agent_hello.get("pid")})
        self.logs.system(f"the new guest agent answered (restart {restart})")

    # ---- end of life --------------------------------------------------------

    def _ttl_watch(self) -> None:
        while not self.destroyed.is_set():
            if self.expires_at is not None and time.time() >= self.expires_at:
                self.destroy("ttl expired")
                self.exit_after_destroy()
                return
            self.destroyed.wait(0.5)

    def destroy(self, reason: str) -> str | None:
        with self.state_lock:
            if self.destroyed.is_set():
                return None
            self.destroyed.set()
        if self.pool is not None:
            pooling.leaving(self, self.pool)
        audit_id = self.audit.record("sandbox.destroy", {"reason": reason})
        self.logs.system(f"sandbox destroyed ({reason})", audit_id)
        self.agent.detach()
        self.network.close()
        self.processes.mark_all_lost()
        if self.instance is not None:
            try:
                self.on_backend(self.instance.destroy)
            except Exception:
                traceback.print_exc()
        if self.template_hold is not None:  # nothing runs from it any more: removable before we answer
            self.template_hold.release()
        try:
            from ..snapshots import SnapshotStore

            SnapshotStore().remove_for_sandbox(self.sandbox_id)
        except Exception:
            traceback.print_exc()
        self.state = "destroyed"
        self.receipt_sync.flush()
        self.logs.close()
        self._keep_run_transcript()
        # Gone before the client hears back: destroy() returning means no trace is left,
        # and the name is free again.
        retire_directory(self.directory, self.config.get("name"))
        return audit_id

    def _keep_run_transcript(self) -> None:
        """Under ``mvmctl run`` the run prints what each sandbox did once the script ends:
        keep this (already redacted) log beside the run, since the sandbox dir goes."""
        run_id = self.config.get("run_id")
        if not run_id or not str(run_id).replace("-", "").isalnum():
            return
        target = runs_dir() / str(run_id)
        target.mkdir(mode=0o700, exist_ok=True)
        try:
            shutil.copyfile(self.directory / "logs.jsonl", target / f"{self.sandbox_id}.jsonl")
            os.chmod(target / f"{self.sandbox_id}.jsonl", 0o600)
        except OSError:
            traceback.print_exc()

    def exit_after_destroy(self) -> None:
        self._stop_serving.set()
        if self.listener is not None:
            self.listener.close()
        os._exit(0)


def resolved_template(config: SandboxConfig) -> TemplateHold:
    """The build ``launch`` resolved the template to (one manifest read), if it is still
    there and in the templates folder; else the template resolved (built) here. Held in
    use either way (``hold_template``): no prune in any process removes it from under the
    sandbox."""
    if config.template_dir:
        directory = Path(config.template_dir)
        if directory.parent == templates_dir():
            hold = hold_build(directory)
            if hold is not None:
                return hold
    return hold_template(config.template)


def run(directory: Path, ready_fd: int, secret_env: dict[str, str]) -> int:
    """Entry point of the detached supervisor process (after ``__main__`` forked it)."""
    write_supervisor_stamp(directory)  # from now on this process's liveness is the sandbox's
    config = json.loads((directory / "config.json").read_text())
    supervisor = Supervisor(directory, config, secret_env)
    supervisor.boot_ms["process_start"] = round((time.time() - float(config["created_at"])) * 1000, 1)

    def report(message: dict[str, Any]) -> None:
        try:
            os.write(ready_fd, (json.dumps(message) + "\n").encode())
            os.close(ready_fd)
        except OSError:
            pass

    def on_term(signum: int, frame: Any) -> None:
        supervisor.destroy(f"signal {signum}")
        supervisor.exit_after_destroy()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        supervisor.listen()
        supervisor.boot()
    except errors.MvmError as exc:
        report({"ok": False, "error": exc.to_wire()})
        supervisor.destroy(f"create failed: {exc}")
        return 1
    except Exception as exc:
        traceback.print_exc()
        report({"ok": False,
                "error": {"type": "SandboxError", "message": f"create failed: {type(exc).__name__}: {exc}"}})
        supervisor.destroy("create failed")
        return 1
    report({"ok": True, "state": supervisor.describe()})
    supervisor.serve_forever()
    return 0
