"""The workload IR (``workload-v1``): what ``mvmctl compile`` writes and ``up --from-ir`` runs.

One document describes one sandbox and what is done to it, in order::

    {"version": "workload-v1", "workload_id": "agent-tool", "template": "python-3.13",
     "resources": {...}, "network": {...}, "ttl_seconds": 1800, "tags": {}, ...,
     "env": {"MODE": {"kind": "literal", "value": "dev"},
             "API_KEY": {"kind": "secret_ref", "name": "api-key"}},
     "include": {"guest_root": "/app", "paths": ["src"], "files": [{"path": "src/x.py", "size": 12,
                 "sha256": "...", "mode": 420}], "tree_sha256": "..."},
     "operations": [{"op": "files.write", "path": "/app/main.py", "sha256": "...", ...},
                    {"op": "commands.start", "argv": [...], "env": {...}, "cwd": null, ...},
                    {"op": "sandbox.destroy"}]}

The published schema is ``schema/workload-v1.json`` (JSON Schema draft 2020-12); a
document is validated against it when written and when read. Its canonical form is
RFC 8785 JSON (:func:`canonical_bytes`); its id is the sha256 of that form
(:func:`ir_hash`), and ``workload.json`` holds exactly those bytes.

An output (a directory, or a deterministic ``.tar.gz`` of the same tree)::

    workload.json        the IR, canonical bytes
    plan.json            the plan and admission report made when it was compiled
    files/<sha256>       every byte string the IR names: included files, file writes, stdin
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import rfc8785
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from .. import errors
from .recording import Recording

VERSION = "workload-v1"
#: Operations an IR may hold (the vocabulary of the recording, minus reads and ``sandbox.create``).
OPERATIONS = (
    "files.write", "files.mkdir", "files.remove", "files.move",
    "commands.run", "commands.start",
    "process.signal", "process.stdin", "process.close_stdin",
    "sandbox.stop", "sandbox.start", "sandbox.pause", "sandbox.resume", "sandbox.snapshot", "sandbox.destroy",
)
SPEC_FIELDS = ("template", "name", "workload_id", "backend", "resources", "network", "ttl_seconds", "tags",
               "from_snapshot", "env", "include")
#: Creation options a document holds only when the script set them (absent = the default:
#: never auto-paused, no principal), so documents written before they existed stay valid.
OPTIONAL_SPEC_FIELDS = ("auto_pause_seconds", "on_behalf_of")
WORKLOAD_FILE = "workload.json"
PLAN_FILE = "plan.json"
FILES_DIR = "files"
ARCHIVE_ROOT = "workload"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
#: Refuse archives that unpack to more than this (a compression bomb).
MAX_ARCHIVE_BYTES = 2 * 1024 * 1024 * 1024

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class IRInvalid(errors.InvalidArgument):
    """A workload document or output is not valid; ``field`` is the path of the bad field."""

    wire_type = "IRInvalid"


# ---- schema, canonical form, hash --------------------------------------------------------


def schema_path() -> Path:
    """``schema/workload-v1.json`` at the repository root."""
    return Path(__file__).resolve().parents[3] / "schema" / "workload-v1.json"


@cache
def load_schema() -> dict[str, Any]:
    path = schema_path()
    try:
        schema: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise errors.MvmError(f"the workload IR schema is missing: {path}") from None
    Draft202012Validator.check_schema(schema)
    return schema


def canonical_bytes(doc: Any) -> bytes:
    """RFC 8785 canonical JSON: sorted keys, no insignificant whitespace, ES6 numbers."""
    return rfc8785.dumps(doc)


def ir_hash(doc: dict[str, Any]) -> str:
    """The workload's id: sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_bytes(doc)).hexdigest()


def tree_hash(files: list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of the included files list (path, size, sha256, mode), sorted by path."""
    entries = sorted(({"path": f["path"], "size": f["size"], "sha256": f["sha256"], "mode": f["mode"]}
                      for f in files), key=lambda f: f["path"])
    return hashlib.sha256(canonical_bytes(entries)).hexdigest()


def _field_path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def validate(doc: Any, *, source: str = WORKLOAD_FILE) -> None:
    """Schema and consistency checks; raises :class:`IRInvalid` naming the bad field's path."""
    validator = Draft202012Validator(load_schema())
    error = best_match(validator.iter_errors(doc))
    if error is not None:
        raise _invalid(error, source)
    _check_consistency(doc, source)


def _invalid(error: ValidationError, source: str) -> IRInvalid:
    return IRInvalid(_field_path(error.absolute_path), f"{error.message} ({source} is not a valid {VERSION} document)")


def _check_consistency(doc: dict[str, Any], source: str) -> None:
    def bad(field: str, message: str) -> IRInvalid:
        return IRInvalid(field, f"{message} ({source} is not a valid {VERSION} document)")

    files = doc["include"]["files"]
    paths = [f["path"] for f in files]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise bad("include.files", f"{dup!r} is listed twice")
    if doc["include"]["tree_sha256"] != tree_hash(files):
        raise bad("include.tree_sha256", "does not match the listed files")
    started = snapshots = 0
    destroyed = False
    for i, op in enumerate(doc["operations"]):
        kind = op["op"]
        if destroyed:
            raise bad(f"operations[{i}]", f"{kind} comes after sandbox.destroy")
        if kind == "commands.start":
            if op["process"] != started:
                raise bad(f"operations[{i}].process", f"must be {started} (the count of earlier commands.start)")
            started += 1
        elif kind.startswith("process.") and op["process"] >= started:
            raise bad(f"operations[{i}].process", f"{op['process']} names no earlier commands.start")
        elif kind == "sandbox.snapshot":
            if op["snapshot"] != snapshots:
                raise bad(f"operations[{i}].snapshot", f"must be {snapshots} (the count of earlier snapshots)")
            snapshots += 1
        elif kind == "sandbox.resume" and op["snapshot"] is not None and "recorded" in op["snapshot"] \
                and op["snapshot"]["recorded"] >= snapshots:
            raise bad(f"operations[{i}].snapshot.recorded", "names no earlier sandbox.snapshot")
        elif kind == "sandbox.destroy":
            destroyed = True


def referenced_blobs(doc: dict[str, Any]) -> dict[str, tuple[int | None, str]]:
    """sha256 -> (size if known, the first field naming it) for every byte string the IR uses."""
    out: dict[str, tuple[int | None, str]] = {}
    for i, f in enumerate(doc["include"]["files"]):
        out.setdefault(f["sha256"], (f["size"], f"include.files[{i}].sha256"))
    for i, op in enumerate(doc["operations"]):
        if op["op"] in ("files.write", "process.stdin"):
            out.setdefault(op["sha256"], (op["size"], f"operations[{i}].sha256"))
        elif op["op"] == "commands.run" and op.get("stdin_sha256"):
            out.setdefault(op["stdin_sha256"], (None, f"operations[{i}].stdin_sha256"))
    return out


# ---- from a recording --------------------------------------------------------------------


def build_ir(recording: Recording, sandbox: int = 0) -> dict[str, Any]:
    """Lower one recorded sandbox to a validated ``workload-v1`` document."""
    events = recording.events_of(sandbox)
    if not events or events[0].get("op") != "sandbox.create":
        raise errors.InvalidArgument("sandbox", f"the recording has no sandbox #{sandbox + 1}")
    create = events[0]
    doc: dict[str, Any] = {"version": VERSION}
    for key in SPEC_FIELDS:
        doc[key] = create[key]
    for key in OPTIONAL_SPEC_FIELDS:
        if create.get(key) is not None:
            doc[key] = create[key]
    include = dict(create["include"])
    include["tree_sha256"] = tree_hash(include["files"])
    doc["include"] = include
    doc["operations"] = [{k: v for k, v in e.items() if k not in ("seq", "sandbox", "at")}
                         for e in events[1:] if e.get("op") in OPERATIONS]
    validate(doc, source="the recording")
    return doc


def operation_sites(recording: Recording, sandbox: int = 0) -> tuple[str | None, list[str | None]]:
    """``file:line`` of the create call and of each IR operation (for the plan)."""
    events = recording.events_of(sandbox)
    return events[0].get("at"), [e.get("at") for e in events[1:] if e.get("op") in OPERATIONS]


# ---- writing an output -------------------------------------------------------------------


def is_archive(path: Path | str) -> bool:
    return str(path).endswith(ARCHIVE_SUFFIXES)


def check_output_target(out: Path) -> None:
    """Refuse ``--out`` paths we must not overwrite (before any work is done)."""
    if is_archive(out):
        if out.is_dir():
            raise errors.InvalidArgument("--out", f"{out} is a directory, not an archive path")
        return
    if out.exists() and not out.is_dir():
        raise errors.InvalidArgument("--out", f"{out} exists and is not a directory",
                                     allowed="a new or empty directory, an earlier compile output, or X.tar.gz")
    if out.is_dir() and any(out.iterdir()) and not (out / WORKLOAD_FILE).is_file():
        raise errors.InvalidArgument("--out", f"{out} is a non-empty directory that holds no {WORKLOAD_FILE}",
                                     allowed="a new or empty directory, an earlier compile output, or X.tar.gz")


def output_entries(doc: dict[str, Any], plan: dict[str, Any],
                   blob: Callable[[str], bytes]) -> list[tuple[str, bytes]]:
    """``(relative path, bytes)`` of every file of an output, in a fixed order."""
    entries = [(WORKLOAD_FILE, canonical_bytes(doc)),
               (PLAN_FILE, (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode())]
    for digest in sorted(referenced_blobs(doc)):
        data = blob(digest)
        if hashlib.sha256(data).hexdigest() != digest:
            raise errors.MvmError(f"recorded bytes {digest} changed while compiling")
        entries.append((f"{FILES_DIR}/{digest}", data))
    return entries


def write_output(out: Path, doc: dict[str, Any], plan: dict[str, Any], blob: Callable[[str], bytes]) -> Path:
    """Write a directory or a ``.tar.gz`` atomically: on any failure nothing is left at ``out``."""
    validate(doc)
    out = Path(out)
    check_output_target(out)
    entries = output_entries(doc, plan, blob)
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_archive(out):
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(deterministic_tar_gz(entries))
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return out
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp_dir, 0o755)
        (tmp_dir / FILES_DIR).mkdir(mode=0o755)
        for rel, data in entries:
            target = tmp_dir / rel
            target.write_bytes(data)
            os.chmod(target, 0o644)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        try:
            os.rename(tmp_dir, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out


def deterministic_tar_gz(entries: list[tuple[str, bytes]]) -> bytes:
    """A gzip'd tar whose bytes depend only on ``entries``: fixed order, mtime 0,
    uid/gid 0, no user names, fixed modes, gzip header mtime 0 and no file name."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = sorted({ARCHIVE_ROOT} | {f"{ARCHIVE_ROOT}/{rel.rsplit('/', 1)[0]}" for rel, _ in entries if "/" in rel})
        for name in dirs:
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0, 0o755))
        for rel, data in sorted(entries):
            tar.addfile(_tarinfo(f"{ARCHIVE_ROOT}/{rel}", tarfile.REGTYPE, len(data), 0o644), io.BytesIO(data))
    return buf.getvalue()


def _tarinfo(name: str, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# ---- reading an output -------------------------------------------------------------------


@dataclass
class LoadedIR:
    """A validated IR output: the document, its hash, its plan (if any) and its files."""

    doc: dict[str, Any]
    sha256: str
    root: Path
    plan: dict[str, Any] | None
    canonical: bool  # workload.json holds exactly the canonical bytes

    def blob(self, digest: str) -> bytes:
        return (self.root / FILES_DIR / digest).read_bytes()


def _strict_json(data: bytes, source: str) -> Any:
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise IRInvalid(key, f"appears twice in one object ({source})")
            out[key] = value
        return out

    def no_constants(name: str) -> Any:
        raise IRInvalid("(document)", f"{name} is not JSON ({source})")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_dupes, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IRInvalid("(document)", f"{source} is not JSON: {exc}") from None


@contextlib.contextmanager
def open_ir(path: Path | str) -> Iterator[LoadedIR]:
    """Open and fully validate an IR directory or archive (schema, consistency, every file's
    sha256 and size). An archive is unpacked into a private temporary directory."""
    path = Path(path)
    if not path.exists():
        raise errors.InvalidArgument("PATH", f"{path} does not exist", allowed="a compile output directory or .tar.gz")
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="mvm-ir-") as tmp:
            root = _unpack(path, Path(tmp))
            yield _load_dir(root, path)
        return
    yield _load_dir(path, path)


def load_ir(path: Path | str) -> LoadedIR:
    """Validate and return an IR directory (an archive needs :func:`open_ir`)."""
    path = Path(path)
    if path.is_file():
        raise errors.InvalidArgument("PATH", f"{path} is an archive: open it with open_ir()")
    with open_ir(path) as loaded:
        return loaded


def _load_dir(root: Path, shown: Path) -> LoadedIR:
    source = f"{shown}/{WORKLOAD_FILE}" if shown.is_dir() else f"{shown}:{WORKLOAD_FILE}"
    try:
        raw = (root / WORKLOAD_FILE).read_bytes()
    except FileNotFoundError:
        raise errors.InvalidArgument("PATH", f"{shown} holds no {WORKLOAD_FILE}",
                                     allowed="a compile output directory or .tar.gz") from None
    doc = _strict_json(raw, source)
    validate(doc, source=source)
    for digest, (size, field) in referenced_blobs(doc).items():
        blob_path = root / FILES_DIR / digest
        if blob_path.is_symlink() or not blob_path.is_file():
            raise IRInvalid(field, f"{FILES_DIR}/{digest} is missing from {shown}")
        data = blob_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest or (size is not None and len(data) != size):
            raise IRInvalid(field, f"{FILES_DIR}/{digest} in {shown} does not match its sha256/size (edited?)")
    plan = None
    if (root / PLAN_FILE).is_file():
        plan = _strict_json((root / PLAN_FILE).read_bytes(), f"{shown}/{PLAN_FILE}")
    digest = ir_hash(doc)
    if isinstance(plan, dict) and plan.get("workloads") and \
            any(w.get("workload_sha256") != digest for w in plan["workloads"]):
        raise IRInvalid("plan.json", f"was made for another workload than {WORKLOAD_FILE} (sha256 {digest})")
    return LoadedIR(doc=doc, sha256=digest, root=root, plan=plan, canonical=raw == canonical_bytes(doc))


def _unpack(archive: Path, dest: Path) -> Path:
    """Extract only what an IR archive may hold (``[workload/]workload.json``, ``plan.json``,
    ``files/<sha256>``): regular files, no links, no paths outside, bounded size."""
    total = 0
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                parts = name.split("/")
                if parts and parts[0] == ARCHIVE_ROOT:
                    parts = parts[1:]
                rel = "/".join(p for p in parts if p)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise IRInvalid(member.name, f"{archive} holds a link or special file")
                allowed = rel in (WORKLOAD_FILE, PLAN_FILE) or (
                    len(parts) == 2 and parts[0] == FILES_DIR and _SHA_RE.match(parts[1]) is not None)
                if not allowed:
                    raise IRInvalid(member.name, f"{archive} holds an unexpected entry",
                                    allowed=f"{WORKLOAD_FILE}, {PLAN_FILE}, {FILES_DIR}/<sha256>")
                total += member.size
                if total > MAX_ARCHIVE_BYTES:
                    raise IRInvalid(member.name, f"{archive} unpacks to more than {MAX_ARCHIVE_BYTES} bytes")
                source = tar.extractfile(member)
                assert source is not None
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as fh:
                    shutil.copyfileobj(source, fh)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise errors.InvalidArgument("PATH", f"{archive} is not a readable IR archive: {exc}") from None
    return dest
