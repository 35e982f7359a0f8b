"""The workload IR: schema, canonical form, hash, outputs (directory and deterministic .tar.gz)."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from modes_helpers import REPO

import mvm
from mvm import errors
from mvm.modes import admission, ir
from mvm.modes.recording import reset_recording
from mvm.sdk.policy import LIMITS


@pytest.fixture
def recorded(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    base = tmp_path / "base"
    (base / "src" / "pkg").mkdir(parents=True)
    (base / "src" / "pkg" / "mod.py").write_text("X = 1\n")
    (base / "src" / "run.py").write_text("print('run')\n")
    monkeypatch.setenv("MVM_INCLUDE_BASE", str(base))
    recording = reset_recording()
    with mvm.Sandbox.create("python-3.13", mode="record", workload_id="w", include=["src"],
                            env={"MODE": "dev", "KEY": mvm.secret("api-key")}) as sb:
        sb.files.write("/app/main.py", "print('hello')")
        sb.commands.run(["python", "/app/main.py"], timeout_seconds=30, stdin=b"input")
        p = sb.commands.start(["sleep", "9"], env={"T": mvm.secret("tok")})
        p.kill()
    yield recording
    reset_recording()


def test_schema_is_draft_2020_12_and_bounds_match_the_sdk() -> None:
    schema = json.loads((REPO / "schema" / "workload-v1.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    props = schema["properties"]["resources"]["properties"]
    for field, (low, high) in LIMITS.items():
        assert (props[field]["minimum"], props[field]["maximum"]) == (low, high), field
    assert set(schema["$defs"]["operation"]["properties"]["op"]["enum"]) == set(ir.OPERATIONS)


def test_build_ir_holds_everything_the_issue_lists(recorded) -> None:
    doc = ir.build_ir(recorded)
    assert doc["version"] == "workload-v1" and doc["workload_id"] == "w" and doc["template"] == "python-3.13"
    assert doc["env"] == {"KEY": {"kind": "secret_ref", "name": "api-key"},
                          "MODE": {"kind": "literal", "value": "dev"}}
    files = doc["include"]["files"]
    assert [f["path"] for f in files] == ["src/pkg/mod.py", "src/run.py"]
    assert files[1]["sha256"] == hashlib.sha256(b"print('run')\n").hexdigest() and files[1]["size"] == 13
    assert doc["include"]["tree_sha256"] == ir.tree_hash(files)
    assert [op["op"] for op in doc["operations"]] == ["files.write", "commands.run", "commands.start",
                                                     "process.signal", "sandbox.destroy"]
    run = doc["operations"][1]
    assert run["argv"] == ["python", "/app/main.py"] and run["timeout_seconds"] == 30 and run["cwd"] is None
    assert doc["operations"][2]["env"] == {"T": {"kind": "secret_ref", "name": "tok"}}
    ir.validate(doc)


def test_hash_is_sha256_of_rfc8785_canonical_json(recorded) -> None:
    doc = ir.build_ir(recorded)
    canonical = ir.canonical_bytes(doc)
    assert json.loads(canonical) == doc and ir.canonical_bytes(json.loads(canonical)) == canonical
    assert canonical.startswith(b'{"backend":null,"env":{') and b'"cpu_cores":1,' in canonical  # ES6 numbers
    assert b" " not in canonical.replace(b"print('hello')", b"")  # no insignificant whitespace
    assert ir.ir_hash(doc) == hashlib.sha256(canonical).hexdigest()
    shuffled = json.loads(json.dumps(doc), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert ir.ir_hash(shuffled) == ir.ir_hash(doc)


def _broken(doc: dict, path: tuple, value) -> dict:
    broken = copy.deepcopy(doc)
    target = broken
    for part in path[:-1]:
        target = target[part]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return broken


@pytest.mark.parametrize("path, value, field", [
    (("version",), "workload-v2", "version"),
    (("resources", "memory_mb"), "512", "resources.memory_mb"),
    (("resources", "cpu_cores"), 1000, "resources.cpu_cores"),
    (("network", "mode"), "wide-open", "network.mode"),
    (("ttl_seconds",), 0, "ttl_seconds"),
    (("env", "KEY"), {"kind": "secret_ref"}, "env.KEY"),
    (("env", "KEY"), {"kind": "secret_ref", "name": "x", "value": "leak"}, "env.KEY"),
    (("env", "MODE"), {"kind": "literal", "value": 3}, "env.MODE.value"),
    (("include", "files", 0, "path"), "../etc/passwd", "include.files[0].path"),
    (("include", "files", 0, "sha256"), "abc", "include.files[0].sha256"),
    (("include", "tree_sha256"), "0" * 64, "include.tree_sha256"),
    (("operations", 1, "argv"), [], "operations[1].argv"),
    (("operations", 1, "timeout_seconds"), -5, "operations[1].timeout_seconds"),
    (("operations", 0, "path"), "relative.py", "operations[0].path"),
    (("operations", 0, "op"), "files.chmod", "operations[0].op"),
    (("operations", 3, "process"), 4, "operations[3].process"),
    (("template",), KeyError, "(document)"),
])
def test_invalid_documents_are_refused_naming_the_field(recorded, path, value, field) -> None:
    doc = ir.build_ir(recorded)
    with pytest.raises(ir.IRInvalid) as exc:
        ir.validate(_broken(doc, path, value))
    assert exc.value.field == field, str(exc.value)
    assert str(exc.value).startswith(f"{field}: ")


def test_operations_after_destroy_are_refused(recorded) -> None:
    doc = ir.build_ir(recorded)
    doc["operations"].append({"op": "sandbox.stop"})
    with pytest.raises(ir.IRInvalid, match=r"after sandbox\.destroy") as exc:
        ir.validate(doc)
    assert exc.value.field == "operations[5]"


def _plan(doc: dict) -> dict:
    return admission.make_plan([(doc, None)])


def test_directory_output_is_validated_on_read(recorded, tmp_path: Path) -> None:
    doc = ir.build_ir(recorded)
    out = ir.write_output(tmp_path / "out", doc, _plan(doc), recorded.blob)
    assert (out / "workload.json").read_bytes() == ir.canonical_bytes(doc)
    names = sorted(p.name for p in (out / "files").iterdir())
    assert names == sorted(ir.referenced_blobs(doc))
    loaded = ir.load_ir(out)
    assert loaded.sha256 == ir.ir_hash(doc) and loaded.canonical and loaded.doc == doc
    blob = out / "files" / doc["operations"][0]["sha256"]
    blob.write_bytes(b"print('tampered')")
    with pytest.raises(ir.IRInvalid, match="does not match") as exc:
        ir.load_ir(out)
    assert exc.value.field == "operations[0].sha256"
    blob.unlink()
    with pytest.raises(ir.IRInvalid, match="missing"):
        ir.load_ir(out)


def test_edited_workload_json_is_refused(recorded, tmp_path: Path) -> None:
    doc = ir.build_ir(recorded)
    out = ir.write_output(tmp_path / "out", doc, _plan(doc), recorded.blob)
    edited = json.loads((out / "workload.json").read_text())
    edited["resources"]["memory_mb"] = 1
    (out / "workload.json").write_text(json.dumps(edited, indent=2))
    with pytest.raises(ir.IRInvalid) as exc:
        ir.load_ir(out)
    assert exc.value.field == "resources.memory_mb"
    (out / "workload.json").write_text('{"version": "workload-v1", "version": "x"}')
    with pytest.raises(ir.IRInvalid, match="twice"):
        ir.load_ir(out)


def test_pretty_printed_workload_is_accepted_with_the_same_hash(recorded, tmp_path: Path) -> None:
    doc = ir.build_ir(recorded)
    out = ir.write_output(tmp_path / "out", doc, _plan(doc), recorded.blob)
    (out / "workload.json").write_text(json.dumps(doc, indent=4))
    loaded = ir.load_ir(out)
    assert loaded.sha256 == ir.ir_hash(doc) and not loaded.canonical


def test_archive_is_deterministic(recorded, tmp_path: Path) -> None:
    doc = ir.build_ir(recorded)
    a = ir.write_output(tmp_path / "a.tar.gz", doc, _plan(doc), recorded.blob).read_bytes()
    b = ir.write_output(tmp_path / "b.tar.gz", doc, _plan(doc), recorded.blob).read_bytes()
    assert a == b
    assert a[4:8] == b"\0\0\0\0"  # gzip header mtime
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:2] == ["workload", "workload/files"]
    assert names[2:] == sorted(names[2:]) and "workload/workload.json" in names
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    with ir.open_ir(tmp_path / "a.tar.gz") as loaded:
        assert loaded.sha256 == ir.ir_hash(doc)


def _tar(path: Path, entries: list[tuple[str, bytes]], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


@pytest.mark.parametrize("entries, symlink", [
    ([("../evil", b"x")], None),
    ([("workload/../../evil", b"x")], None),
    ([("/etc/evil", b"x")], None),
    ([("workload/workload.json", b"{}")], "workload/files/" + "a" * 64),
    ([("workload/notes.txt", b"x")], None),
])
def test_hostile_archives_are_refused(tmp_path: Path, entries, symlink) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", entries, symlink)
    with pytest.raises(errors.InvalidArgument):
        with ir.open_ir(archive):
            pass
    assert not (tmp_path / "evil").exists()


def test_archive_is_gzip_with_no_file_name(recorded, tmp_path: Path) -> None:
    doc = ir.build_ir(recorded)
    data = ir.write_output(tmp_path / "x.tar.gz", doc, _plan(doc), recorded.blob).read_bytes()
    assert data[3] & 0x08 == 0  # FNAME flag unset
    assert gzip.decompress(data)  # a valid gzip stream
