"""The per-sandbox supervisor: owns the backend instance, the agent link, TTL, logs, audit.

It is started detached by ``launch.spawn_supervisor`` and serves clients on
``control.sock`` with the protocol of docs/protocol.md. Guest operations are
checked against the lifecycle state, audited, then forwarded to the agent.
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
from typing import Any, cast

from .. import errors
from ..backends import get_backend
from ..backends.base import BackendInstance, NetworkPolicy, Resources, SandboxSpec
from ..paths import receipts_dir, runs_dir
from ..protocol import CHUNK_SIZE, codec
from ..protocol.channel import ChannelClosed, FramedChannel
from ..protocol.codec import Frame, ProtocolError
from ..security.secrets import Redactor
from ..templates import ensure_template
from .agent_link import AgentLink
from .audit import Auditor, set_actor
from .logbook import LogBook
from .network import NETWORK_OPS, NetworkManager
from .processes import ProcessTable
from .state import CONTROL_SOCKET, write_json_atomic

#: Default and largest capture per stream for ``exec.run``.
DEFAULT_MAX_OUTPUT = 4 * 1024 * 1024
MAX_OUTPUT_LIMIT = 256 * 1024 * 1024
#: Guest operations forwarded to the agent as they are (after state check + audit).
FORWARDED_OPS = frozenset({
    "fs.read", "fs.write", "fs.write_begin", "fs.write_chunk", "fs.write_end", "fs.list", "fs.stat",
    "fs.mkdir", "fs.remove", "fs.move", "proc.stdin", "proc.signal", "proc.list",
})
#: Ops whose frequent chunks are audited once per transfer, not per chunk.
UNAUDITED_OPS = frozenset({"fs.write_chunk", "fs.write_end", "proc.list", "fs.stat"})


class RequestContext:
    """One client request being served: its id, its connection, and whether it was cancelled."""

    def __init__(self, session: ClientSession, frame: Frame):
        self.session = session
        self.id = frame.header["id"]
        self.op = frame.header["op"]
        self.args: dict[str, Any] = frame.header.get("args") or {}
        self.payload = frame.payload
        self.cancelled = threading.Event()

    def send_data(self, stream: str, payload: bytes) -> None:
        for start in range(0, max(len(payload), 1), CHUNK_SIZE):
            self.session.send(codec.data(self.id, stream, payload[start : start + CHUNK_SIZE]))


class ClientSession:
    """One client connection: a reader thread, a thread per request."""

    def __init__(self, supervisor: Supervisor, sock: socket.socket):
        self.supervisor = supervisor
        self.channel = FramedChannel(sock)
        self.actor = _peer_actor(sock)
        self.inflight: dict[int, RequestContext] = {}
        self.closed = threading.Event()

    def send(self, encoded: bytes) -> None:
        try:
            self.channel.send_raw(encoded)
        except ChannelClosed:
            self.closed.set()

    def serve(self) -> None:
        try:
            self.channel.handshake("supervisor", sandbox_id=self.supervisor.sandbox_id)
            while True:
                frame = self.channel.recv()
                if frame.kind == "request":
                    ctx = RequestContext(self, frame)
                    self.inflight[ctx.id] = ctx
                    threading.Thread(target=self._run, args=(ctx,), daemon=True,
                                     name=f"mvm-req-{ctx.op}").start()
                elif frame.kind == "cancel":
                    ctx_or_none = self.inflight.get(frame.header["id"])
                    if ctx_or_none is not None:
                        ctx_or_none.cancelled.set()
        except (ChannelClosed, ProtocolError, OSError):
            pass
        finally:
            self.closed.set()
            for ctx in list(self.inflight.values()):
                ctx.cancelled.set()
            self.channel.close()

    def _run(self, ctx: RequestContext) -> None:
        set_actor(self.actor)
        try:
            result, payload = self.supervisor.handle(ctx)
            self.send(codec.response_ok(ctx.id, result, payload))
        except errors.MvmError as exc:
            self.send(codec.encode({"kind": "response", "id": ctx.id, "ok": False, "error": exc.to_wire()}))
        except Exception as exc:  # a bug: answer, log, keep serving
            traceback.print_exc()
            self.send(codec.response_error(ctx.id, "Internal", f"{type(exc).__name__}: {exc}"))
        finally:
            self.inflight.pop(ctx.id, None)
            if ctx.op == "sandbox.destroy":
                self.supervisor.exit_after_destroy()


class OutputCapture:
    """What ``exec.run`` returns of a process's output: redacted across chunk boundaries,
    capped per stream, counted in full; the bytes sent are kept for the receipt."""

    STREAMS = ("stdout", "stderr")

    def __init__(self, cap: int, redactor: Redactor | None, send: Callable[[str, bytes], None]):
        self.cap = cap
        self.send = send
        self.total = dict.fromkeys(self.STREAMS, 0)
        self.captured = {name: bytearray() for name in self.STREAMS}
        self.truncated = False
        self._redact = {name: redactor.stream() for name in self.STREAMS} if redactor else None

    def deliver(self, stream: str, data: bytes) -> None:
        if stream not in self.total:
            return
        self.total[stream] += len(data)
        if self._redact is not None:
            data = self._redact[stream].feed(data)
        self._emit(stream, data)

    def finish(self) -> None:
        if self._redact is not None:
            for name in self.STREAMS:
                # only bytes are fed; a stream never fed flushes "", which _emit drops as empty
                self._emit(name, cast(bytes, self._redact[name].flush()))
            self._redact = None

    def _emit(self, stream: str, data: bytes) -> None:
        if not data:
            return
        room = self.cap - len(self.captured[stream])
        piece = data[: max(room, 0)]
        if len(piece) < len(data):
            self.truncated = True
        if piece:
            self.captured[stream] += piece
            self.send(stream, piece)


class Supervisor:
    def __init__(self, directory: Path, config: dict[str, Any], secret_env: dict[str, str]):
        self.directory = directory
        self.config = config
        self.sandbox_id: str = config["id"]
        self.secret_env = secret_env  # env key -> value; in memory only
        self.state = "creating"
        self.state_lock = threading.RLock()
        self.created_at = float(config.get("created_at") or time.time())
        ttl = config.get("ttl_seconds")
        self.expires_at: float | None = self.created_at + float(ttl) if ttl else None
        self.error: str | None = None
        # secret name -> value (memory only), for redaction as [redacted:NAME]
        names = config.get("secret_env_names") or {}
        self.secrets: dict[str, str] = {names.get(k, k): v for k, v in secret_env.items()}
        self.redactor = Redactor(self.secrets)
        self.logs = LogBook(directory / "logs.jsonl", redact=self._redact)
        self.audit = Auditor(self.sandbox_id, self.logs)
        self.processes = ProcessTable()
        self.agent = AgentLink(on_event=self._on_agent_event, on_lost=self._on_agent_lost)
        self.backend = get_backend(config["backend"])
        self.instance: BackendInstance | None = None
        self.template_digest: str | None = None
        self.boot_ms: dict[str, float] = {}
        self._phase_start = time.perf_counter()
        # Every backend call runs on this one long-lived thread: children started with
        # PR_SET_PDEATHSIG (bwrap --die-with-parent, QEMU) die when the *thread* that
        # spawned them exits, so they must never be spawned from a request thread.
        self._backend_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mvm-backend")
        self.listener: socket.socket | None = None
        self._stop_serving = threading.Event()
        self._destroyed = threading.Event()
        self.network = NetworkManager(self)  # port forwards, egress proxy (TCP streams over the agent link)

    # ---- boot ---------------------------------------------------------------

    def _mark(self, phase: str) -> None:
        """Record how long each boot phase took (``describe().details["boot_ms"]``)."""
        now = time.perf_counter()
        self.boot_ms[phase] = round((now - self._phase_start) * 1000, 1)
        self._phase_start = now

    def boot(self) -> None:
        template = ensure_template(self.config["template"])
        self.template_digest = template.digest
        self._mark("template")
        spec = SandboxSpec(
            sandbox_id=self.sandbox_id,
            template=template,
            resources=Resources(**self.config["resources"]),
            network=NetworkPolicy(**{**self.config["network"],
                                     "allow": tuple(self.config["network"].get("allow", ()))}),
            state_dir=self.directory,
        )
        spec.backend_dir.mkdir(exist_ok=True)
        self.instance = self.on_backend(self.backend.create, spec)
        self._mark("backend_create")
        snapshot_id = self.config.get("from_snapshot")
        if snapshot_id:
            self._restore_from(snapshot_id)
        else:
            sock = self.on_backend(self.instance.start)
            self._mark("backend_start")
            self.agent.attach(sock)
            self._mark("agent_hello")
            self._configure_agent()
        self._mark("agent_configure")
        audit_id = self.audit.record("sandbox.create", {"template": self.config["template"],
                                                        "backend": self.config["backend"]})
        self._mark("audit")
        self.logs.system(f"sandbox created from template {self.config['template']} on backend "
                         f"{self.config['backend']}", audit_id)
        self._set_state("running")

    def on_backend(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the backend thread and return its result."""
        return self._backend_thread.submit(fn, *args).result()

    def _redact(self, text: str) -> str:
        """Mask every secret value this supervisor has handled (log lines, outputs)."""
        return self.redactor.redact(text)

    def _learn_secrets(self, names: dict[str, str], env: dict[str, str]) -> None:
        fresh = {name: env[key] for key, name in names.items() if key in env}
        if any(self.secrets.get(n) != v for n, v in fresh.items()):
            self.secrets.update(fresh)
            self.redactor = Redactor(self.secrets)

    def _configure_agent(self) -> None:
        self.agent.call("agent.configure", {
            "clock_epoch": time.time(),
            "entropy_hex": _secrets.token_hex(32),
            "hostname": "sandbox",
        }, timeout=15)
        self.network.agent_attached()

    def _restore_from(self, snapshot_id: str) -> None:
        from ..security.sealing import SnapshotStore
        from . import snapshots

        assert self.instance is not None
        # Verified whole first; a VM's memory image then streams through the unsealer.
        sock, info = snapshots.restore(self.instance, SnapshotStore(), snapshot_id, run=self.on_backend)
        self.processes.new_boot()
        self.agent.attach(sock)
        self._configure_agent()
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
        self.listener.settimeout(0.5)
        while not self._stop_serving.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(None)
            threading.Thread(target=ClientSession(self, conn).serve, daemon=True, name="mvm-client").start()

    # ---- state --------------------------------------------------------------

    def _set_state(self, state: str, error: str | None = None) -> None:
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
                        "agent": self.agent.agent_hello},
        }

    def require_state(self, op: str, *allowed: str, auto_resume: bool = False) -> None:
        with self.state_lock:
            state = self.state
        if state in allowed:
            return
        if state == "paused" and "running" in allowed:
            if auto_resume:
                self._resume()
                return
            raise errors.SandboxPaused(f"{op}: sandbox {self.config['name']} is paused; resume it first "
                                       f"(or pass auto_resume=True)", state=state)
        raise errors.InvalidState(f"{op}: not allowed while the sandbox is {state} (allowed in: {', '.join(allowed)})",
                                  state=state, allowed=list(allowed))

    # ---- dispatch -----------------------------------------------------------

    def handle(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        op = ctx.op
        if op in FORWARDED_OPS:
            return self._forward(ctx)
        if op in NETWORK_OPS:
            return self.network.handle(ctx)
        handler = self.HANDLERS.get(op)
        if handler is None:
            raise errors.UnknownOp(f"unknown operation {op!r}",
                                   allowed=sorted([*self.HANDLERS, *FORWARDED_OPS, *NETWORK_OPS]))
        return handler(self, ctx)

    def _forward(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        self.require_state(ctx.op, "running", auto_resume=bool(ctx.args.pop("auto_resume", False)))
        audit = ctx.op not in UNAUDITED_OPS
        try:
            result, payload = self.agent.call(ctx.op, ctx.args, ctx.payload)
        except errors.MvmError as exc:
            if audit:
                self.audit.record(ctx.op, _digestable(ctx), outcome="error", error_type=exc.wire_type)
            raise
        if audit:
            result["audit_id"] = self.audit.record(ctx.op, _digestable(ctx),
                                                   details={"bytes": len(payload) or len(ctx.payload)})
        return result, payload

    def _op_describe(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        return self.describe(), b""

    def _op_ping(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        return {"state": self.state}, b""

    def _op_logs(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        tail = ctx.args.get("tail")
        since = ctx.args.get("since")
        offset = self.logs.size()
        count = 0
        for entry in self.logs.read(tail=int(tail) if tail else None, since=since):
            ctx.send_data("log", json.dumps(entry).encode())
            count += 1
        if ctx.args.get("follow"):
            stop = threading.Event()

            def watch() -> None:
                while not (ctx.cancelled.is_set() or ctx.session.closed.is_set() or self._destroyed.is_set()):
                    time.sleep(0.2)
                stop.set()

            threading.Thread(target=watch, daemon=True).start()
            for entry in self.logs.follow(offset, stop):
                ctx.send_data("log", json.dumps(entry).encode())
                count += 1
        return {"count": count}, b""

    def _env_for(self, env: dict[str, Any]) -> dict[str, str]:
        merged = {**self.config.get("env", {}), **self.secret_env}
        for key, value in (env or {}).items():
            merged[str(key)] = str(value)
        return merged

    def _start_process(self, ctx: RequestContext, op: str, stdin: bool) -> tuple[int, str]:
        argv = ctx.args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise errors.InvalidArgument("argv", "must be a non-empty list of strings",
                                         allowed="e.g. ['python', 'main.py']")
        env = self._env_for(ctx.args.get("env") or {})
        secret_names = dict(ctx.args.get("secret_names") or {})
        self._learn_secrets(secret_names, env)
        secret_keys = set(secret_names) | set(self.secret_env)
        audit_args = {"argv": argv, "env_keys": sorted(env), "cwd": ctx.args.get("cwd"), "user": ctx.args.get("user")}
        try:
            result, _ = self.agent.call("proc.start", {"argv": argv, "env": env, "cwd": ctx.args.get("cwd"),
                                                       "user": ctx.args.get("user"), "stdin": stdin,
                                                       "stdin_path": ctx.args.get("stdin_path")})
        except errors.MvmError as exc:
            self.audit.record(op, audit_args, outcome="error", error_type=exc.wire_type)
            raise
        pid = int(result["pid"])
        audit_id = self.audit.record(op, audit_args, details={"pid": pid, "secret_env_keys": sorted(secret_keys)})
        self.processes.started(pid, argv, audit_id)
        self.logs.system(f"started pid {pid}: {_argv_summary(argv)}", audit_id)
        return pid, audit_id

    def _op_proc_start(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        self.require_state(ctx.op, "running", auto_resume=bool(ctx.args.get("auto_resume")))
        pid, audit_id = self._start_process(ctx, "proc.start", stdin=bool(ctx.args.get("stdin")))
        return {"pid": pid, "audit_id": audit_id}, b""

    def _op_exec_run(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        """Run to completion: stream (redacted, capped) output, enforce the timeout on the
        whole process group, and leave a signed receipt of what was returned."""
        self.require_state(ctx.op, "running", auto_resume=bool(ctx.args.get("auto_resume")))
        cap = int(ctx.args.get("max_output_bytes") or DEFAULT_MAX_OUTPUT)
        if not 0 < cap <= MAX_OUTPUT_LIMIT:
            raise errors.InvalidArgument("max_output_bytes", f"{cap} is out of range", allowed=f"1..{MAX_OUTPUT_LIMIT}")
        timeout = ctx.args.get("timeout_seconds")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise errors.InvalidArgument("timeout_seconds", f"{timeout!r} must be a positive number")
        started_wall = time.time()
        started = time.monotonic()
        capture = OutputCapture(cap, self.redactor if ctx.args.get("redact", True) else None, ctx.send_data)
        pid, audit_id = self._start_process(ctx, "exec.run", stdin=bool(ctx.payload))
        record = self.processes.subscribe(pid, capture.deliver, replay=True)
        try:
            if ctx.payload:
                for start in range(0, len(ctx.payload), CHUNK_SIZE):
                    self.agent.call("proc.stdin", {"pid": pid, "eof": False}, ctx.payload[start : start + CHUNK_SIZE])
                self.agent.call("proc.stdin", {"pid": pid, "eof": True})
            deadline = None if timeout is None else started + float(timeout)
            while not record.exited.wait(0.1):
                if ctx.cancelled.is_set() or ctx.session.closed.is_set():
                    self._kill_group(pid)
                    raise errors.Cancelled("exec.run cancelled by the client; its process group was killed")
                if deadline is not None and time.monotonic() > deadline:
                    self._kill_group(pid)
                    record.exited.wait(5)
                    self.processes.unsubscribe(pid, capture.deliver)
                    capture.finish()
                    self.logs.system(f"pid {pid} killed after its {timeout} s timeout", audit_id)
                    raise errors.CommandTimeout(
                        f"command timed out after {timeout} s; its process group was killed",
                        pid=pid, audit_id=audit_id, timeout_seconds=timeout)
        finally:
            self.processes.unsubscribe(pid, capture.deliver)
        capture.finish()
        duration = time.monotonic() - started
        self.logs.system(f"pid {pid} exited with {record.exit_code}", audit_id)
        receipt = self._write_receipt(ctx, audit_id, record.exit_code, capture, started_wall)
        return {
            "exit_code": record.exit_code, "signal": record.signal, "timed_out": False,
            "truncated": capture.truncated, "duration_seconds": duration, "pid": pid, "audit_id": audit_id,
            "stdout_bytes": capture.total["stdout"], "stderr_bytes": capture.total["stderr"],
            "receipt_path": str(receipt),
        }, b""

    def _write_receipt(self, ctx: RequestContext, audit_id: str, exit_code: int | None, capture: OutputCapture,
                       started_at: float) -> Path:
        from ..security.receipts import write_receipt

        return write_receipt(
            receipts_dir(), sandbox_id=self.sandbox_id, template=self.config["template"],
            template_digest=self.template_digest, argv=ctx.args["argv"],
            env_keys=self._env_for(ctx.args.get("env") or {}).keys(), exit_code=exit_code,
            stdout=bytes(capture.captured["stdout"]), stderr=bytes(capture.captured["stderr"]),
            started_at=started_at, ended_at=time.time(), audit_id=audit_id,
            truncated={name: capture.total[name] > len(capture.captured[name]) for name in ("stdout", "stderr")},
        )

    def _sync_guest(self) -> None:
        """Flush guest writes to the disk layer, so a stop or snapshot loses nothing."""
        try:
            self.agent.call("fs.sync", {}, timeout=30)
        except errors.MvmError as exc:
            self.logs.system(f"guest sync failed: {exc}")

    def _kill_group(self, pid: int) -> None:
        try:
            self.agent.call("proc.signal", {"pid": pid, "signal": "KILL", "group": True}, timeout=10)
        except errors.MvmError:
            pass

    def _pid_arg(self, ctx: RequestContext) -> int:
        pid = ctx.args.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise errors.InvalidArgument("pid", f"{pid!r} is not a process id")
        return pid

    def _known_record(self, pid: int) -> Any:
        record = self.processes.get(pid)
        if record is None:
            raise errors.ProcessNotFound(f"no process with pid {pid} was started in this sandbox", pid=pid)
        return record

    def _op_proc_attach(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        pid = self._pid_arg(ctx)
        self._known_record(pid)

        def deliver(stream: str, data: bytes) -> None:
            ctx.send_data(stream, data)

        record = self.processes.subscribe(pid, deliver, replay=bool(ctx.args.get("replay", True)))
        try:
            while not record.exited.wait(0.2):
                if ctx.cancelled.is_set() or ctx.session.closed.is_set():
                    raise errors.Cancelled("proc.attach cancelled")
        finally:
            self.processes.unsubscribe(pid, deliver)
        return {"exit_code": record.exit_code, "signal": record.signal, "truncated": record.dropped_bytes > 0}, b""

    def _op_proc_wait(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        pid = self._pid_arg(ctx)
        record = self._known_record(pid)
        timeout = ctx.args.get("timeout_seconds")
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        while not record.exited.wait(0.2):
            if ctx.cancelled.is_set() or ctx.session.closed.is_set():
                raise errors.Cancelled("proc.wait cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise errors.CommandTimeout(f"pid {pid} still running after {timeout} s", pid=pid)
        return {"exit_code": record.exit_code, "signal": record.signal}, b""

    def _op_proc_info(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        pid = self._pid_arg(ctx)
        return self._known_record(pid).info(), b""

    # ---- lifecycle ----------------------------------------------------------

    def _op_stop(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        self.require_state("stop", "running", "paused", "stopped")
        if self.state != "stopped":
            assert self.instance is not None
            if self.state == "paused":
                self._resume()
            self._sync_guest()
            self.agent.detach()
            self.on_backend(self.instance.stop)
            self.processes.mark_all_lost()
            self._set_state("stopped")
        self.logs.system("sandbox stopped", self.audit.record("sandbox.stop", {}))
        return self.describe(), b""

    def _op_start(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        self.require_state("start", "stopped", "running")
        if self.state == "stopped":
            assert self.instance is not None
            self.processes.new_boot()
            self.agent.attach(self.on_backend(self.instance.start))
            self._configure_agent()
            self._set_state("running")
        self.logs.system("sandbox started", self.audit.record("sandbox.start", {}))
        return self.describe(), b""

    def _op_pause(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        self.require_state("pause", "running", "paused")
        if self.state == "running":
            assert self.instance is not None
            self.on_backend(self.instance.pause)
            self._set_state("paused")
        self.logs.system("sandbox paused", self.audit.record("sandbox.pause", {}))
        return self.describe(), b""

    def _resume(self) -> None:
        assert self.instance is not None
        self.on_backend(self.instance.resume)
        self._set_state("running")
        try:  # the guest clock stood still while paused
            self.agent.call("agent.configure", {"clock_epoch": time.time()}, timeout=15)
        except errors.MvmError:
            pass

    def _op_resume(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        snapshot = ctx.args.get("snapshot")
        if snapshot:
            self.require_state("resume", "running", "paused", "stopped")
            assert self.instance is not None
            self.agent.detach()
            self.on_backend(self.instance.stop)
            self._restore_from(str(snapshot))
            self._set_state("running")
        else:
            self.require_state("resume", "paused", "running")
            if self.state == "paused":
                self._resume()
        self.logs.system("sandbox resumed" + (f" from snapshot {snapshot}" if snapshot else ""),
                         self.audit.record("sandbox.resume", {"snapshot": snapshot}))
        return self.describe(), b""

    def _op_snapshot(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        from ..security.sealing import SnapshotStore
        from . import snapshots

        self.require_state("snapshot", "running", "paused", "stopped")
        assert self.instance is not None
        name = str(ctx.args.get("name") or time.strftime("snap-%Y%m%d-%H%M%S"))
        store = SnapshotStore()
        if self.state == "running":
            self._sync_guest()
        # A VM's memory image streams QEMU -> sealer -> store; the rest is sealed from staging.
        info, artifacts = snapshots.save(self.instance, store, name, self.sandbox_id, staging_parent=self.directory,
                                         expires=ctx.args.get("expires"), keep=bool(ctx.args.get("keep")),
                                         run=self.on_backend)
        audit_id = self.audit.record("snapshot.save", {"name": name, "snapshot": info.id},
                                     details={"kind": artifacts.kind})
        self.logs.system(f"snapshot {info.id} ({name}, {artifacts.kind}) saved", audit_id)
        return {**info.to_wire(), "audit_id": audit_id}, b""

    def _op_destroy(self, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
        audit_id = self.destroy("requested")
        return {"audit_id": audit_id}, b""

    HANDLERS: dict[str, Callable[[Supervisor, RequestContext], tuple[dict[str, Any], bytes]]] = {
        "ping": _op_ping,
        "sandbox.describe": _op_describe,
        "sandbox.logs": _op_logs,
        "sandbox.stop": _op_stop,
        "sandbox.start": _op_start,
        "sandbox.pause": _op_pause,
        "sandbox.resume": _op_resume,
        "sandbox.snapshot": _op_snapshot,
        "sandbox.destroy": _op_destroy,
        "exec.run": _op_exec_run,
        "proc.start": _op_proc_start,
        "proc.attach": _op_proc_attach,
        "proc.wait": _op_proc_wait,
        "proc.info": _op_proc_info,
    }

    # ---- agent events -------------------------------------------------------

    def _on_agent_event(self, frame: Frame) -> None:
        name = frame.header["event"]
        if name == "proc.output":
            pid = int(frame.header["pid"])
            stream = str(frame.header.get("stream", "stdout"))
            self.processes.output(pid, stream, frame.payload)
            self.logs.process_output(pid, stream, frame.payload)
        elif name == "proc.exit":
            pid = int(frame.header["pid"])
            self.logs.process_exit(pid)
            self.processes.exit(pid, int(frame.header.get("exit_code", -1)), frame.header.get("signal"),
                                frame.header.get("ended_at"))

    def _on_agent_lost(self, reason: str) -> None:
        if self.state in ("running", "paused") and not self._destroyed.is_set():
            self.logs.system(f"guest agent lost: {reason}")
            self.processes.mark_all_lost()
            self._set_state("error", error=reason)

    # ---- end of life --------------------------------------------------------

    def _ttl_watch(self) -> None:
        while not self._destroyed.is_set():
            if self.expires_at is not None and time.time() >= self.expires_at:
                self.destroy("ttl expired")
                self.exit_after_destroy()
                return
            self._destroyed.wait(0.5)

    def destroy(self, reason: str) -> str | None:
        with self.state_lock:
            if self._destroyed.is_set():
                return None
            self._destroyed.set()
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
        try:
            from ..security.sealing import SnapshotStore

            SnapshotStore().remove_for_sandbox(self.sandbox_id)
        except Exception:
            traceback.print_exc()
        self.state = "destroyed"
        self.logs.close()
        self._keep_run_transcript()
        # Gone before the client hears back: destroy() returning means no trace is left.
        shutil.rmtree(self.directory, ignore_errors=True)
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


def _peer_actor(sock: socket.socket) -> dict[str, Any] | None:
    """Who is on the other end of a client connection (pid, uid, user), from SO_PEERCRED."""
    import struct

    from ..security.audit import actor_for

    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", creds)
    return dict(actor_for(pid, uid))


def _argv_summary(argv: list[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= 200 else text[:200] + "…"


def _digestable(ctx: RequestContext) -> dict[str, Any]:
    args = {k: v for k, v in ctx.args.items() if k not in ("env",)}
    if ctx.payload:
        args["payload"] = ctx.payload
    return args


def run(directory: Path, ready_fd: int, secret_env: dict[str, str]) -> int:
    """Entry point of the detached supervisor process (after ``__main__`` forked it)."""
    (directory / "supervisor.pid").write_text(str(os.getpid()))
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
        shutil.rmtree(directory, ignore_errors=True)
        return 1
    except Exception as exc:
        traceback.print_exc()
        report({"ok": False,
                "error": {"type": "SandboxError", "message": f"create failed: {type(exc).__name__}: {exc}"}})
        supervisor.destroy("create failed")
        shutil.rmtree(directory, ignore_errors=True)
        return 1
    report({"ok": True, "state": supervisor.describe()})
    supervisor.serve_forever()
    return 0
