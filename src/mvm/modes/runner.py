"""Running a workload script in a mode, and replaying a compiled workload.

* :func:`record_script` runs the script (a child of this Python, with ``MVM_MODE``
  and ``MVM_RECORDING`` set, the script's folder as its include base) and returns
  what it recorded. The child gets no ``MVM_SECRET_*`` variables (record/plan mode
  never needs a secret's value), no stdin, and a time limit (default 60 s). A
  script that raises, exits non-zero or runs out of time gives :class:`ScriptFailed`
  with the script's own traceback line.
* :func:`compile_script` lowers the recording to the IR and writes ``--out`` (a
  directory or a deterministic ``.tar.gz``), atomically: nothing is left on failure.
* :func:`plan_script` records, then admits (:mod:`mvm.modes.admission`).
* :func:`run_live` runs the script for real; its exit status passes through, and
  sandboxes it left running (tagged with this run's ``MVM_RUN_ID``) are destroyed.
* :func:`replay` runs a compiled workload live (``mvmctl up --from-ir``).

A ``.ts``/``.mts``/``.js``/``.mjs`` script runs with Node and the TypeScript SDK
(:mod:`mvm.modes.node`) under the same environment variables; it writes the same
recording events, so the rest is shared.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import secrets
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import errors
from ..osutil import exit_description
from . import DEFAULT_RECORD_TIMEOUT, admission, ir, node
from .recording import RECORDING_ENV, Recording

RUN_ID_ENV = "MVM_RUN_ID"
INCLUDE_BASE_ENV = "MVM_INCLUDE_BASE"
_TIMEOUT_ENV = "MVM_RECORD_TIMEOUT"
_TIMEOUT_DUMP_ENV = "MVM_RECORD_TIMEOUT_DUMP"
#: Seconds past the limit before the whole process group is SIGKILLed (the child's own
#: watchdog normally ends it first, with a traceback).
_KILL_GRACE = 5.0
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
_CHILD_BOOT = "from mvm.modes.runner import _child_main; _child_main()"


class ScriptFailed(errors.MvmError):
    """The workload script raised, exited non-zero or ran past its time limit while recorded.

    ``details`` has ``script``, ``file`` and ``line`` (the script's own frame),
    ``exception`` and ``status``.
    """

    wire_type = "ScriptFailed"


class ScriptTimeout(ScriptFailed):
    wire_type = "ScriptTimeout"


class NotAdmitted(errors.MvmError):
    """A workload failed admission (``up --from-ir`` on a host whose policy refuses it)."""

    wire_type = "NotAdmitted"


# ---- the child (runs inside the recorded script's process) ------------------------------------


def _internal(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR) or filename.startswith("<") or filename == __file__


def _child_main() -> None:
    """Run ``sys.argv[1]`` as ``__main__`` with the rest as its argv; report how it ended
    as a ``script.error``/``script.exit`` event of the recording."""
    import runpy

    from .recording import current_recording

    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(script)
    timeout = float(os.environ.get(_TIMEOUT_ENV) or 0)
    dump_path = os.environ.get(_TIMEOUT_DUMP_ENV)
    dump = None
    if timeout > 0 and dump_path:
        dump = open(dump_path, "w")  # noqa: SIM115 - must stay open for the watchdog
        faulthandler.dump_traceback_later(timeout, exit=True, file=dump)
    recording = current_recording()
    status = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            status = 1
        else:
            status = int(code or 0)
        if status:
            recording.append({"op": "script.exit", "status": status, **_frame_of(exc, script)})
    except BaseException as exc:
        status = 1
        recording.append({"op": "script.error", "status": 1, **_frame_of(exc, script),
                          "exception": type(exc).__name__, "message": str(exc),
                          "field": getattr(exc, "field", None),
                          "traceback": "".join(traceback.format_exception(exc))})
    finally:
        if dump is not None:
            faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.exit(status)


def _frame_of(exc: BaseException, script: str) -> dict[str, Any]:
    """The script's own innermost frame, and the user frames (outside mvm) of the traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not _internal(f.filename)]
    in_script = [f for f in frames if os.path.abspath(f.filename) == script]
    frame = in_script[-1] if in_script else (user[-1] if user else (frames[-1] if frames else None))
    if frame is None:
        return {"file": script, "line": None, "code": None, "frames": []}
    return {"file": frame.filename, "line": frame.lineno, "code": (frame.line or "").strip(),
            "frames": [f"File \"{f.filename}\", line {f.lineno}, in {f.name}\n    {(f.line or '').strip()}"
                       for f in user[-6:]]}


# ---- recording a script -----------------------------------------------------------------------


@dataclass
class ScriptRecording:
    """What a recorded run of a script produced (valid while :func:`record_script` is open)."""

    script: Path
    mode: str
    recording: Recording

    def workloads(self) -> list[tuple[dict[str, Any], tuple[str | None, list[str | None]]]]:
        """Each sandbox the script created, as ``(IR document, call sites)``."""
        return [(ir.build_ir(self.recording, i), ir.operation_sites(self.recording, i))
                for i in self.recording.sandbox_indexes()]


def _script_path(script: Path | str) -> Path:
    path = Path(script)
    if not path.is_file():
        raise errors.InvalidArgument("SCRIPT", f"{script} is not a file")
    return path.resolve()


def _child_env(mode: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MVM_SECRET_") and k not in (RECORDING_ENV, RUN_ID_ENV, _TIMEOUT_ENV, _TIMEOUT_DUMP_ENV)}
    env["MVM_MODE"] = mode
    env.update(extra)
    return env


@contextlib.contextmanager
def record_script(script: Path | str, args: Sequence[str] = (), *, mode: str = "record",
                  timeout: float = DEFAULT_RECORD_TIMEOUT) -> Iterator[ScriptRecording]:
    """Run ``script`` in record (or plan) mode and yield its recording. Nothing boots.

    Raises :class:`ScriptFailed` (with the script's ``file:line``) when it raises,
    exits non-zero, or is still running after ``timeout`` seconds.
    """
    if mode not in ("record", "plan"):
        raise errors.InvalidArgument("mode", f"{mode!r} is not a recording mode", allowed=["record", "plan"])
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 86400:
        raise errors.InvalidArgument("--timeout", f"{timeout!r} must be a positive number of seconds")
    path = _script_path(script)
    tmp = Path(tempfile.mkdtemp(prefix="mvm-rec-"))
    try:
        rec_path = tmp / "recording.jsonl"
        dump_path = tmp / "timeout.txt"
        env = _child_env(mode, {RECORDING_ENV: str(rec_path), INCLUDE_BASE_ENV: str(path.parent),
                                _TIMEOUT_ENV: str(timeout), _TIMEOUT_DUMP_ENV: str(dump_path)})
        try:
            stdout: Any = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            stdout = None
        if node.is_node_script(path):  # TypeScript/JavaScript: the same recording, written by the TS SDK
            command, env = node.node_command(path, args), node.node_env(env)
        else:
            command = [sys.executable, "-c", _CHILD_BOOT, str(path), *args]
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=stdout, start_new_session=True)
        killed = False
        try:
            status = proc.wait(timeout=timeout + _KILL_GRACE)
        except subprocess.TimeoutExpired:
            killed = True
            _kill_group(proc.pid)
            status = proc.wait()
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        _kill_group(proc.pid)  # anything the script left behind in its process group
        recording = Recording.load(rec_path)
        dumped = dump_path.read_text() if dump_path.exists() else ""
        if killed or "Timeout (" in dumped:
            raise _timeout_error(path, timeout, dumped, mode)
        outcome = recording.script_outcome()
        if status != 0 or outcome is not None:
            raise _failure_error(path, status, outcome)
        yield ScriptRecording(script=path, mode=mode, recording=recording)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _timeout_error(script: Path, timeout: float, dumped: str, mode: str) -> ScriptTimeout:
    where = None
    pattern = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')
    for line in dumped.splitlines():
        match = pattern.search(line)
        if match and not _internal(match["file"]):
            where = (match["file"], int(match["line"]))
            break
    text = (f"{_display(script)} did not finish within {timeout:g} s in {mode} mode ({mode} mode never waits "
            "on a sandbox: does it loop forever? raise the limit with --timeout)")
    if where:
        text += f"\n  File \"{where[0]}\", line {where[1]} (where it was running)"
    return ScriptTimeout(text, script=str(script), file=where[0] if where else None,
                         line=where[1] if where else None, timeout_seconds=timeout)


def _failure_error(script: Path, status: int, outcome: dict[str, Any] | None) -> ScriptFailed:
    name = _display(script)
    if outcome is None:
        text = (f"{name} failed (exit status {status}) before it could report where; see its output above"
                if status > 0 else f"{name} {exit_description(status)}")
        return ScriptFailed(text, script=str(script), status=status, file=None, line=None)
    if outcome["op"] == "script.exit":
        text = f"{name} exited with status {outcome['status']}"
    else:
        text = f"{name} raised {outcome['exception']}: {outcome['message']}"
    frames = outcome.get("frames") or []
    if frames:
        text += "\n" + "\n".join("  " + f for f in frames)
    elif outcome.get("line"):
        text += f"\n  File \"{outcome['file']}\", line {outcome['line']}"
    return ScriptFailed(text, script=str(script), status=outcome["status"], file=outcome.get("file"),
                        line=outcome.get("line"), exception=outcome.get("exception"), field=outcome.get("field"))


# ---- compile, plan ------------------------------------------------------------------------------


@dataclass
class Compiled:
    out: Path
    doc: dict[str, Any]
    sha256: str
    plan: dict[str, Any]

    def summary(self, script: Path | str) -> str:
        doc = self.doc
        files = len(doc["include"]["files"])
        ops = len(doc["operations"])
        admitted = "admitted on this host" if self.plan["admitted"] else "NOT admitted on this host (see plan.json)"
        return (f"compiled {script} -> {self.out}: workload {doc['workload_id'] or '(no id)'}, "
                f"template {doc['template']}, {files} included file{'s' if files != 1 else ''}, "
                f"{ops} operation{'s' if ops != 1 else ''}, {admitted}; sha256 {self.sha256}")

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "sha256": self.sha256, "workload_id": self.doc["workload_id"],
                "template": self.doc["template"], "included_files": len(self.doc["include"]["files"]),
                "operations": len(self.doc["operations"]), "admitted": self.plan["admitted"],
                "reasons": self.plan["reasons"]}


def _single_workload(rec: ScriptRecording) -> tuple[dict[str, Any], tuple[str | None, list[str | None]]]:
    workloads = rec.workloads()
    if not workloads:
        raise errors.InvalidArgument("SCRIPT",
                                     f"{_display(rec.script)} created no sandbox: there is nothing to compile")
    if len(workloads) > 1:
        sites = ", ".join(str(w[1][0]) for w in workloads)
        raise errors.InvalidArgument("SCRIPT", f"{_display(rec.script)} created {len(workloads)} sandboxes ({sites}); "
                                     "a workload IR describes one", allowed="one Sandbox.create per compiled script")
    return workloads[0]


def compile_script(script: Path | str, out: Path | str, args: Sequence[str] = (), *,
                   timeout: float = DEFAULT_RECORD_TIMEOUT) -> Compiled:
    """``mvmctl compile``: record, lower to the IR, write ``out`` (directory or ``.tar.gz``)."""
    out = Path(out)
    ir.check_output_target(out)  # refuse before running anything
    with record_script(script, args, mode="record", timeout=timeout) as rec:
        doc, sites = _single_workload(rec)
        plan = admission.make_plan([(doc, sites)])
        ir.write_output(out, doc, plan, rec.recording.blob)
    return Compiled(out=out, doc=doc, sha256=ir.ir_hash(doc), plan=plan)


def plan_script(script: Path | str, args: Sequence[str] = (), *,
                timeout: float = DEFAULT_RECORD_TIMEOUT) -> dict[str, Any]:
    """``mvmctl run --mode plan``: record, then admit every sandbox the script creates."""
    with record_script(script, args, mode="plan", timeout=timeout) as rec:
        return admission.make_plan(rec.workloads())


# ---- live -----------------------------------------------------------------------------------------


@dataclass
class LiveRun:
    status: int
    run_id: str
    torn_down: list[dict[str, str]]
    #: sandbox id -> its log events (lifecycle, audit summaries, process output), redacted
    transcripts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def collect_transcripts(run_id: str) -> dict[str, list[dict[str, Any]]]:
    """The logs the run's sandboxes left at destroy (then removed from disk)."""
    from ..paths import runs_dir

    directory = runs_dir() / run_id
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(directory.glob("sb-*.jsonl"), key=lambda p: p.stat().st_mtime):
        out[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    shutil.rmtree(directory, ignore_errors=True)
    return out


def teardown_run(run_id: str) -> list[dict[str, str]]:
    """Destroy the sandboxes created with ``$MVM_RUN_ID == run_id`` that are still running."""
    from ..sdk.sandbox import Sandbox

    gone = []
    for info in Sandbox.list():
        if info.details.get("run_id") != run_id:
            continue
        with contextlib.suppress(errors.SandboxNotFound):
            Sandbox.connect(info.id).kill()
            gone.append({"id": info.id, "name": info.name})
    return gone


def run_live(script: Path | str, args: Sequence[str] = ()) -> LiveRun:
    """``mvmctl run --mode live``: run the script for real (stdin/stdout/stderr are the
    caller's); leftovers of this run are destroyed when it exits, however it exits."""
    path = _script_path(script)
    run_id = "run-" + secrets.token_hex(6)
    env = {k: v for k, v in os.environ.items() if k not in (RECORDING_ENV, _TIMEOUT_ENV, _TIMEOUT_DUMP_ENV)}
    env.update({"MVM_MODE": "live", RUN_ID_ENV: run_id, INCLUDE_BASE_ENV: str(path.parent)})
    if node.is_node_script(path):
        command, env = node.node_command(path, args), node.node_env(env)
    else:
        command = [sys.executable, str(path), *args]
    proc = subprocess.Popen(command, env=env)
    try:
        while True:
            try:
                status = proc.wait()
                break
            except KeyboardInterrupt:
                continue  # the script got the same SIGINT; wait for it to finish its cleanup
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        torn_down = teardown_run(run_id)
    return LiveRun(status=status if status >= 0 else 128 - status, run_id=run_id, torn_down=torn_down,
                   transcripts=collect_transcripts(run_id))


# ---- replay (up --from-ir) ------------------------------------------------------------------------


def decode_env(env: dict[str, dict[str, str]]) -> dict[str, Any]:
    from ..security.secrets import SecretRef

    return {k: SecretRef(v["name"]) if v["kind"] == "secret_ref" else v["value"] for k, v in env.items()}


def replay(path: Path | str, *, name: str | None = None, backend: str | None = None,
           echo: Callable[[str], None] | None = None, stream: bool = True) -> dict[str, Any]:
    """Run a compiled workload live: admit it on this host, create the sandbox, write the
    included files, then replay every operation in order. Each result is reported through
    ``echo`` (``None``: silent) and returned. On any failure the sandbox is destroyed.
    A workload that does not end with ``sandbox.destroy`` is left running (like ``mvmctl up``)."""
    from ..spec import NetworkPolicy, Resources
    from ..sdk.sandbox import Sandbox

    say = echo or (lambda _text: None)
    with ir.open_ir(path) as loaded:
        doc = loaded.doc
        report = admission.make_plan([(doc, None)])
        if not report["admitted"]:
            reasons = "; ".join(f"{r['field']}: {r['message']}" for r in report["reasons"])
            raise NotAdmitted(f"workload {loaded.sha256[:16]} is not admitted on this host: {reasons}",
                              reasons=[r["message"] for r in report["reasons"]])
        net = doc["network"]
        sandbox = Sandbox.create(
            doc["template"], mode="live", name=name or doc["name"], workload_id=doc["workload_id"],
            ttl=doc["ttl_seconds"], include=None, resources=Resources.from_json(doc["resources"]),
            network=NetworkPolicy.from_json(net),
            env=decode_env(doc["env"]), backend=backend or doc["backend"], tags=doc["tags"],
            from_snapshot=doc["from_snapshot"], auto_pause=doc.get("auto_pause_seconds"),
            on_behalf_of=doc.get("on_behalf_of"))
        say(f"sandbox {sandbox.name} ({sandbox.id}) from workload {doc['workload_id'] or ''} "
            f"sha256 {loaded.sha256}")
        results: list[dict[str, Any]] = []
        destroyed = False
        try:
            root = doc["include"]["guest_root"].rstrip("/")
            for f in doc["include"]["files"]:
                sandbox.files.write(f"{root}/{f['path']}", loaded.blob(f["sha256"]), mode=f["mode"])
            if doc["include"]["files"]:
                say(f"included {len(doc['include']['files'])} file(s) into {root}")
            processes: list[Any] = []
            snapshots: list[Any] = []
            for n, op in enumerate(doc["operations"], 1):
                result = _apply(sandbox, op, loaded, processes, snapshots, say if stream else None)
                results.append(result)
                say(f"[{n}] {_describe_result(op, result)}")
                if op["op"] == "sandbox.destroy":
                    destroyed = True
        except BaseException:
            sandbox.kill()
            raise
        if not destroyed:
            say(f"sandbox {sandbox.name} is running; `mvmctl down {sandbox.name}` ends it")
            sandbox.close()
        return {"sandbox": {"id": sandbox.id, "name": sandbox.name}, "workload_sha256": loaded.sha256,
                "results": results, "destroyed": destroyed}


def _apply(sandbox: Any, op: dict[str, Any], loaded: ir.LoadedIR, processes: list[Any], snapshots: list[Any],
           say: Callable[[str], None] | None) -> dict[str, Any]:
    kind = op["op"]
    out: dict[str, Any] = {"op": kind}
    if kind == "files.write":
        sandbox.files.write(op["path"], loaded.blob(op["sha256"]), mode=op["mode"], make_parents=op["make_parents"])
        out.update(path=op["path"], size=op["size"])
    elif kind == "files.mkdir":
        sandbox.files.mkdir(op["path"], parents=op["parents"], mode=op["mode"])
    elif kind == "files.remove":
        sandbox.files.remove(op["path"], recursive=op["recursive"])
    elif kind == "files.move":
        sandbox.files.move(op["src"], op["dst"], overwrite=op["overwrite"])
    elif kind == "commands.run":
        printer = (lambda text: say(text.rstrip("\n"))) if say else None
        result = sandbox.commands.run(
            op["argv"], env=decode_env(op["env"]), cwd=op["cwd"], timeout_seconds=op["timeout_seconds"],
            max_output_bytes=op["max_output_bytes"], check=op["check"], auto_resume=op["auto_resume"],
            stdin=loaded.blob(op["stdin_sha256"]) if op["stdin_sha256"] else None,
            on_stdout=printer, on_stderr=printer)
        out.update(argv=op["argv"], **result.to_dict())
    elif kind == "commands.start":
        proc = sandbox.commands.start(op["argv"], env=decode_env(op["env"]), cwd=op["cwd"], stdin=op["stdin"],
                                      auto_resume=op["auto_resume"])
        processes.append(proc)
        out.update(argv=op["argv"], pid=proc.pid, audit_id=proc.audit_id)
    elif kind == "process.signal":
        processes[op["process"]].signal(op["signal"], group=op["group"])
    elif kind == "process.stdin":
        processes[op["process"]].send_stdin(loaded.blob(op["sha256"]))
    elif kind == "process.close_stdin":
        processes[op["process"]].close_stdin()
    elif kind == "sandbox.snapshot":
        snap = sandbox.snapshot(op["name"], expires=op["expires_seconds"], keep=op["keep"])
        snapshots.append(snap)
        out.update(snapshot=snap.to_dict())
    elif kind == "sandbox.resume":
        ref = op["snapshot"]
        target = None if ref is None else (snapshots[ref["recorded"]] if "recorded" in ref else ref["id"])
        out.update(state=sandbox.resume(target).state)
    elif kind in ("sandbox.stop", "sandbox.start", "sandbox.pause"):
        out.update(state=getattr(sandbox, kind.split(".")[1])().state)
    elif kind == "sandbox.destroy":
        sandbox.kill()
    else:  # validated documents hold no other op
        raise errors.InvalidArgument("op", f"unknown operation {kind!r}", allowed=list(ir.OPERATIONS))
    return out


def _describe_result(op: dict[str, Any], result: dict[str, Any]) -> str:
    summary = admission.summarize_operation(op)
    if op["op"] == "commands.run":
        extra = " (output truncated)" if result.get("truncated") else ""
        return (f"{summary} -> exit {result['exit_code']} in {result['duration_seconds']:.2f}s, "
                f"audit {result['audit_id']}{extra}")
    if op["op"] == "commands.start":
        return f"{summary} -> pid {result['pid']}, audit {result['audit_id']}"
    if "state" in result:
        return f"{summary} -> {result['state']}"
    return f"{summary} -> done"
