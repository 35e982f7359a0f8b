"""The process operations: ``exec.run`` (run to completion: redacted, capped output, a
timeout on the whole process group, a signed receipt) and ``proc.start`` / ``proc.attach``
/ ``proc.wait`` / ``proc.info`` on the processes this supervisor started.

A process is its pid and the agent generation that started it (``agent_generation`` in
the ``proc.start`` answer; a handle sends it back). A request naming an earlier agent's
process is answered from that process's record, or refused with ``ProcessNotFound``
saying it ended with that agent -- never applied to a new process that got its pid."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import Future
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from .. import errors
from ..protocol import CHUNK_SIZE
from ..protocol.codec import STREAM_WINDOW, Frame
from ..protocol.requests import DEFAULT_MAX_OUTPUT_BYTES, MAX_OUTPUT_LIMIT
from ..security.secrets import Redactor
from .agent_link import AgentReplaced, PendingCall
from .processes import Outbox, ProcessRecord

if TYPE_CHECKING:
    from ..security.receipts import StreamDigest
    from .server import Supervisor
    from .session import Reply, RequestContext

#: Takes a piece of a process's output from a request's outbox (sends it on to the client).
Consumer = Callable[[str, bytes], object]



class OutputCapture:
    """What ``exec.run`` returns of a process's output: redacted across chunk boundaries,
    capped per stream, counted in full; the bytes sent are hashed as they go, for the
    receipt (never kept: a run capturing 255 MiB held it here twice more for the hash)."""

    STREAMS = ("stdout", "stderr")

    def __init__(self, cap: int, redactor: Redactor | None, send: Callable[[str, bytes], object]):
        self.cap = cap
        self.send = send
        self.total = dict.fromkeys(self.STREAMS, 0)
        self.sent = dict.fromkeys(self.STREAMS, 0)
        self._hashes = {name: hashlib.sha256() for name in self.STREAMS}
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
        room = self.cap - self.sent[stream]
        piece = data[: max(room, 0)]
        if len(piece) < len(data):
            self.truncated = True
        if piece:
            self._hashes[stream].update(piece)
            self.sent[stream] += len(piece)
            self.send(stream, piece)

    def digest(self, stream: str) -> StreamDigest:
        """What was sent of ``stream``, as the receipt holds it."""
        from ..security.canonical import sha256_digest
        from ..security.receipts import StreamDigest  # (crypto loads off the supervisor's start)

        return StreamDigest(sha256_digest(self._hashes[stream]), self.sent[stream])


def env_for(sup: Supervisor, env: dict[str, Any]) -> dict[str, str]:
    """The environment a command runs with: the sandbox's, its secrets, then the call's own."""
    merged = {**sup.config.get("env", {}), **sup.secret_env}
    for key, value in (env or {}).items():
        merged[str(key)] = str(value)
    return merged


class StartedProcess(NamedTuple):
    """What ``start_process`` gives: the process's record, the environment it got, and
    its audit entry's durability (wait for it with :func:`await_audit` before the reply
    and before any of its output is sent)."""

    record: ProcessRecord
    env: dict[str, str]
    audited: Future[None]


def start_process(sup: Supervisor, ctx: RequestContext, op: str, stdin: bool) -> StartedProcess:
    """Start the process (audited)."""
    argv = ctx.arg.argv()
    env = env_for(sup, ctx.arg.env())
    # env key -> secret name: the shape of an env (never a null value without allow_unset)
    secret_names = {key: str(name) for key, name in ctx.arg.env("secret_names").items()}
    sup.learn_secrets(secret_names, env)
    secret_keys = set(secret_names) | set(sup.secret_env)
    audit_args = {"argv": argv, "env_keys": sorted(env), "cwd": ctx.args.get("cwd"), "user": ctx.args.get("user")}
    # The audit entry is written while the agent starts the process, not before, and made
    # durable (fdatasync) on the audit-sync thread while the process runs: the caller waits
    # for that before its reply and before any of the process's output reaches the client
    # (await_audit), which is what the entry vouches for (docs/security.md, "Audit
    # durability"). It records the request; a guest that refuses to start it adds an error
    # entry.
    starting = sup.agent.submit("proc.start", {"argv": argv, "env": env, "cwd": ctx.args.get("cwd"),
                                               "user": ctx.args.get("user"), "stdin": stdin,
                                               "stdin_path": ctx.args.get("stdin_path"),
                                               "output_window": STREAM_WINDOW},
                                  on_answer=lambda answer, agent: sup.processes.starting(agent, _pid_of(answer)))
    try:
        audit_id, audited = sup.audit.record_deferred(op, audit_args, details={"secret_env_keys": sorted(secret_keys)})
    except BaseException:  # not on record: the process must not run
        _stop_unrecorded(sup, starting)
        raise
    try:
        result, _ = starting.wait()
    except errors.MvmError as exc:
        sup.audit.record(op, audit_args, outcome="error", error_type=exc.wire_type, details={"request": audit_id})
        raise
    pid = int(result["pid"])
    record = sup.processes.started(starting.generation, pid, argv, audit_id)
    sup.logs.system(f"started pid {pid}: {_argv_summary(argv)}", audit_id)
    return StartedProcess(record, env, audited)


def await_audit(sup: Supervisor, started: StartedProcess) -> None:
    """Return once the start's audit entry is on disk. One that cannot be made durable
    fails the call, and the process must not go on unrecorded: its group is killed."""
    try:
        started.audited.result()
    except BaseException:
        _kill_group(sup, started.record)
        raise


def _pid_of(answer: Frame) -> int:
    return int((answer.header.get("result") or {})["pid"])


def _stop_unrecorded(sup: Supervisor, starting: PendingCall) -> None:
    """Kill a process whose audit entry could not be written (its start was already asked)."""
    try:
        result, _ = starting.wait()
    except errors.MvmError:
        return
    _kill_group(sup, ProcessRecord(int(result["pid"]), starting.generation))


def proc_start(sup: Supervisor, ctx: RequestContext) -> Reply:
    started = start_process(sup, ctx, "proc.start", stdin=ctx.arg.boolean("stdin"))
    await_audit(sup, started)
    record = started.record
    return {"pid": record.pid, "audit_id": record.audit_id, "agent_generation": record.generation}, b""


def exec_run(sup: Supervisor, ctx: RequestContext) -> Reply:
    """Run to completion: stream (redacted, capped) output, enforce the timeout on the
    whole process group, and leave a signed receipt of what was returned. Neither the
    reply (an error too) nor the first byte of output leaves before the run's audit entry
    is on disk (:func:`await_audit`)."""
    cap = ctx.arg.integer("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES, minimum=1, maximum=MAX_OUTPUT_LIMIT)
    timeout = _timeout_arg(ctx)
    started_wall = time.time()
    started_at = time.monotonic()
    started = start_process(sup, ctx, "exec.run", stdin=bool(ctx.payload))
    try:
        return _run_to_exit(sup, ctx, started, cap, timeout, started_wall, started_at)
    finally:
        await_audit(sup, started)


def _run_to_exit(sup: Supervisor, ctx: RequestContext, started: StartedProcess, cap: int, timeout: float | None,
                 started_wall: float, started_at: float) -> Reply:
    record = started.record
    pid, audit_id = record.pid, str(record.audit_id)

    def send_data(stream: str, data: bytes) -> None:
        await_audit(sup, started)  # (waits before the first piece only: the future is done after)
        ctx.send_data(stream, data)

    capture = OutputCapture(cap, sup.redactor if ctx.arg.boolean("redact", True) else None, send_data)
    outbox = Outbox(ctx.wake)
    sup.processes.subscribe(record, outbox, replay=True)
    try:
        if ctx.payload:
            _feed_stdin(sup, record, ctx.payload)
        ctx.deadline = None if timeout is None else started_at + float(timeout)
        ended = _until_exit(sup, ctx, record, (outbox, capture.deliver))
        if ended == "cancelled":
            _kill_group(sup, record)
            raise errors.Cancelled("exec.run cancelled by the client; its process group was killed")
        if ended == "timeout":
            _kill_group(sup, record)
            record.exited.wait(5)
            sup.processes.unsubscribe(record, outbox)
            ctx.deadline = None  # what it wrote before the kill still goes to the client
            _relay(sup, ctx, record, outbox, capture.deliver)
            capture.finish()
            sup.logs.system(f"pid {pid} killed after its {timeout} s timeout", audit_id)
            raise errors.CommandTimeout(
                f"command timed out after {timeout} s; its process group was killed",
                pid=pid, audit_id=audit_id, timeout_seconds=timeout)
    finally:
        sup.processes.unsubscribe(record, outbox)
    _check_not_lost(record)
    capture.finish()
    duration = time.monotonic() - started_at
    sup.logs.system(f"pid {pid} exited with {record.exit_code}", audit_id)
    receipt = _write_receipt(sup, ctx, audit_id, started.env.keys(), record.exit_code, capture, started_wall)
    return {
        "exit_code": record.exit_code, "signal": record.signal, "timed_out": False,
        "truncated": capture.truncated, "duration_seconds": duration, "pid": pid, "audit_id": audit_id,
        "stdout_bytes": capture.total["stdout"], "stderr_bytes": capture.total["stderr"],
        "receipt_path": str(receipt),
    }, b""


def _feed_stdin(sup: Supervisor, record: ProcessRecord, payload: bytes) -> None:
    """Feed ``payload`` to the process's stdin off the request's thread: a process that
    never reads it keeps each ``proc.stdin`` unanswered (the agent answers once the pipe
    took the bytes), and the run's timeout and cancellation must still bite. Killing the
    process closes its pipe, which answers the call in flight."""

    pid, generation = record.pid, record.generation

    def feed() -> None:
        try:
            for start in range(0, len(payload), CHUNK_SIZE):
                result, _ = sup.agent.call("proc.stdin", {"pid": pid, "eof": False},
                                           payload[start : start + CHUNK_SIZE], timeout=None, generation=generation)
                if result.get("closed"):
                    return  # the process closed its stdin (or ended): the rest has no reader
            sup.agent.call("proc.stdin", {"pid": pid, "eof": True}, timeout=None, generation=generation)
        except (errors.MvmError, AgentReplaced):
            pass  # the process or the agent went away: the run's outcome says which

    threading.Thread(target=feed, name=f"mvm-stdin-{pid}", daemon=True).start()


def _write_receipt(sup: Supervisor, ctx: RequestContext, audit_id: str, env_keys: Iterable[str],
                   exit_code: int | None, capture: OutputCapture, started_at: float) -> Path:
    from ..security.receipts import write_receipt

    # Durability (docs/security.md, "Audit durability"): the exec.run audit entry was
    # fdatasync'ed before any output left. The receipt is complete and visible (renamed into place) before the
    # reply, so it survives any crash of this process; its fsync runs off the reply's path
    # (sup.receipt_sync: batched, <= 50 ms + the fsync; flushed by destroy), so only a host crash
    # within that window loses it.
    path = write_receipt(
        sup.receipts_dir, sandbox_id=sup.sandbox_id, template=sup.config["template"],
        template_digest=sup.template_digest, argv=ctx.args["argv"],
        env_keys=env_keys, exit_code=exit_code,
        stdout=capture.digest("stdout"), stderr=capture.digest("stderr"),
        started_at=started_at, ended_at=time.time(), audit_id=audit_id,
        truncated={name: capture.total[name] > capture.sent[name] for name in OutputCapture.STREAMS},
        durable=False, signer=sup.audit.signer,
    )
    sup.receipt_sync.add(path)
    return path


def _until_exit(sup: Supervisor, ctx: RequestContext, record: ProcessRecord,
                relay: tuple[Outbox, Consumer] | None = None) -> str:
    """Block until the process exited (``"exited"``), the request is cancelled or its
    connection closed (``"cancelled"``), or ``ctx.deadline`` passed (``"timeout"``);
    meanwhile ``relay`` hands the output put in its outbox to its consumer, at the
    client's pace (a process's exit comes after its last output: once it exited, the
    rest is relayed whatever the deadline). Nothing polls: the exit, new output, the
    client's credit and the cancel all wake it."""
    sup.processes.wake_on_exit(record, ctx.wake)
    try:
        while True:
            ctx.wake.clear()
            exited = record.exited.is_set()
            if exited:
                ctx.deadline = None
            if relay is not None:
                _relay(sup, ctx, record, *relay)
            if ctx.cancelled.is_set() or ctx.session.closed.is_set():
                return "cancelled"
            if exited:
                return "exited"
            remaining = None if ctx.deadline is None else ctx.deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return "timeout"
            ctx.wake.wait(remaining)
    finally:
        sup.processes.stop_waking(record, ctx.wake)


def _relay(sup: Supervisor, ctx: RequestContext, record: ProcessRecord, outbox: Outbox, consume: Consumer) -> None:
    """Hand what ``outbox`` holds to ``consume`` (which waits for the client's credit), each
    piece then released to the agent (``ProcessTable.sent``), until it is empty or the
    request stops."""
    while not ctx.stopping():
        item = outbox.take()
        if item is None:
            return
        try:
            consume(*item)
        finally:
            sup.processes.sent(record, outbox, len(item[1]))


def _kill_group(sup: Supervisor, record: ProcessRecord) -> None:
    """SIGKILL its process group -- through the agent that started it only (a pid of a
    dead agent's process may be a new agent's now)."""
    try:
        sup.agent.call("proc.signal", {"pid": record.pid, "signal": "KILL", "group": True}, timeout=10,
                       generation=record.generation)
    except (errors.MvmError, AgentReplaced):
        pass


def _check_not_lost(record: ProcessRecord) -> None:
    if record.lost:
        raise errors.SandboxError(f"pid {record.pid}: {record.lost} while it ran; its outcome is unknown",
                                  pid=record.pid)


def _pid_arg(ctx: RequestContext) -> int:
    return ctx.arg.integer("pid", minimum=1, required=True)


def _timeout_arg(ctx: RequestContext) -> float | None:
    timeout = ctx.arg.number("timeout_seconds")
    if timeout is not None and timeout <= 0:
        raise errors.InvalidArgument("timeout_seconds", f"{timeout!r} must be a positive number")
    return timeout


def agent_generation(sup: Supervisor, ctx: RequestContext) -> int:
    """The agent generation a request names its process by (``agent_generation``; a
    request by pid alone means the current agent's process)."""
    generation = ctx.arg.integer("agent_generation", minimum=0)
    return sup.agent.generation if generation is None else generation


def ended_with_its_agent(pid: int, generation: int) -> errors.ProcessNotFound:
    """The error for a request about a process of an agent that was since replaced."""
    return errors.ProcessNotFound(
        f"pid {pid} ended with the guest agent that ran it (agent generation {generation}; that agent "
        f"died and was replaced): this handle no longer names a process, and pid {pid} now, if it "
        f"exists, is another process", pid=pid, agent_generation=generation)


def forward_to_its_agent(sup: Supervisor, ctx: RequestContext) -> tuple[dict[str, Any], bytes]:
    """Forward a request naming a process (``proc.signal``, ``proc.stdin``) to the agent
    that started it, and only to that one."""
    generation = agent_generation(sup, ctx)
    ctx.args.pop("agent_generation", None)  # the agent knows no generations
    try:
        return sup.agent.call(ctx.op, ctx.args, ctx.payload, generation=generation)
    except AgentReplaced:
        raise ended_with_its_agent(_pid_arg(ctx), generation) from None


def _known_record(sup: Supervisor, ctx: RequestContext) -> ProcessRecord:
    pid = _pid_arg(ctx)
    generation = agent_generation(sup, ctx)
    record = sup.processes.get(generation, pid)
    if record is None:
        if generation != sup.agent.generation:
            raise ended_with_its_agent(pid, generation)
        raise errors.ProcessNotFound(f"no process with pid {pid} was started in this sandbox", pid=pid)
    return record


def proc_attach(sup: Supervisor, ctx: RequestContext) -> Reply:
    record = _known_record(sup, ctx)
    outbox = Outbox(ctx.wake)
    sup.processes.subscribe(record, outbox, replay=ctx.arg.boolean("replay", True))
    try:
        if _until_exit(sup, ctx, record, (outbox, ctx.send_data)) == "cancelled":
            raise errors.Cancelled("proc.attach cancelled")
    finally:
        sup.processes.unsubscribe(record, outbox)
    _check_not_lost(record)
    return {"exit_code": record.exit_code, "signal": record.signal, "truncated": record.dropped_bytes > 0}, b""


def proc_wait(sup: Supervisor, ctx: RequestContext) -> Reply:
    record = _known_record(sup, ctx)
    pid = record.pid
    timeout = _timeout_arg(ctx)
    ctx.deadline = None if timeout is None else time.monotonic() + timeout
    ended = _until_exit(sup, ctx, record)
    if ended == "cancelled":
        raise errors.Cancelled("proc.wait cancelled")
    if ended == "timeout":
        raise errors.CommandTimeout(f"pid {pid} still running after {timeout} s", pid=pid)
    _check_not_lost(record)
    return {"exit_code": record.exit_code, "signal": record.signal}, b""


def proc_info(sup: Supervisor, ctx: RequestContext) -> Reply:
    return _known_record(sup, ctx).info(), b""


def _argv_summary(argv: list[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= 200 else text[:200] + "…"
