from __future__ import annotations

import itertools
import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mvm.errors import AuditEntryNotFound, InvalidArgument
from mvm.security import audit
from mvm.security.audit import AuditLog, find, follow, tail, verify, verify_entry
from mvm.security.canonical import canonical_json, sha256_hex
from mvm.security.keys import host_public_key, host_public_key_path, sign
from mvm.security.secrets import Redactor

from .conftest import mode


def _log(sandbox_id: str = "sb-1", n: int = 6) -> AuditLog:
    log = AuditLog.for_sandbox(sandbox_id)
    for i in range(n):
        log.append("command.run", {"argv": ["echo", str(i)], "stdin": b"payload"}, details={"i": i})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _rehash(entry: dict) -> dict:
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    entry["hash"] = sha256_hex(canonical_json(body))
    return entry


def test_chain_verifies_and_entries_hold_digests_only(mvm_home: Path) -> None:
    log = _log()
    report = verify(log.path)
    assert report.ok and report.entries == 6 and report.first_bad_seq is None and report.problem is None
    assert log.verify().ok
    assert log.path == mvm_home / "audit" / "sb-1.jsonl"
    assert mode(mvm_home / "audit") == 0o700 and mode(log.path) == 0o600
    entries = [json.loads(line) for line in _lines(log.path)]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0]["prev_hash"] == "0" * 64
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(entries))
    first = entries[0]
    assert first["op"] == "command.run" and first["outcome"] == "ok" and first["sandbox_id"] == "sb-1"
    assert set(first["actor"]) == {"pid", "uid", "user"}
    assert first["args_digest"]["stdin"] == "sha256:" + sha256_hex(b"payload")
    assert first["audit_id"].startswith("aud_") and len({e["audit_id"] for e in entries}) == 6
    assert b"payload" not in log.path.read_bytes() and b"echo" not in log.path.read_bytes()
    assert verify_entry(first) and not verify_entry(dict(first, op="x"))


def test_host_key_created_private_with_public_half(mvm_home: Path) -> None:
    _log(n=1)
    key = mvm_home / "keys" / "audit-ed25519.key"
    assert mode(key) == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    assert host_public_key_path() == mvm_home / "keys" / "audit-ed25519.pub"
    assert verify(audit.log_path("sb-1"), host_public_key_path()).ok


def test_edited_entry_is_detected(mvm_home: Path) -> None:
    log = _log()
    lines = _lines(log.path)
    lines[2] = lines[2].replace(b'"outcome":"ok"', b'"outcome":"error"')
    _write(log.path, lines)
    report = verify(log.path)
    assert not report.ok and report.first_bad_seq == 3 and report.entries == 2
    assert "edited" in report.problem


def test_edited_entry_with_recomputed_hash_is_detected(mvm_home: Path) -> None:
    log = _log()
    lines = _lines(log.path)
    entry = json.loads(lines[3])
    entry["details"] = {"i": 999}
    lines[3] = canonical_json(_rehash(entry)) + b"\n"
    _write(log.path, lines)
    report = verify(log.path)
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert "signature does not verify" in report.problem


def test_deleted_entry_is_detected(mvm_home: Path) -> None:
    log = _log()
    lines = _lines(log.path)
    del lines[2]
    _write(log.path, lines)
    report = verify(log.path)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "missing" in report.problem and "deleted" in report.problem


def test_deleted_newest_entries_are_detected_through_the_index(mvm_home: Path) -> None:
    log = _log()
    _write(log.path, _lines(log.path)[:4])
    report = verify(log.path)
    assert (report.ok, report.first_bad_seq, report.entries) == (False, 5, 4)
    assert "index records seq 6" in report.problem
    assert verify(log.path, index=False).ok  # without the index it is a valid shorter chain


def test_inserted_entries_are_detected(mvm_home: Path) -> None:
    log = _log()
    lines = _lines(log.path)
    forged = json.loads(lines[1])
    forged.update(seq=3, prev_hash=forged["hash"], op="file.write", audit_id=audit.new_audit_id())
    _rehash(forged)
    forged["sig"] = sign(Ed25519PrivateKey.generate(), audit.SIG_DOMAIN, forged["hash"].encode())
    _write(log.path, [*lines[:2], canonical_json(forged) + b"\n", *lines[2:]])
    report = verify(log.path)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "signature" in report.problem

    _write(log.path, [*lines[:4], lines[1], *lines[4:]])  # a copy of seq 2 replayed after seq 4
    report = verify(log.path)
    assert (report.ok, report.first_bad_seq) == (False, 5)
    assert "inserted" in report.problem


def test_reordered_entries_are_detected(mvm_home: Path) -> None:
    log = _log()
    lines = _lines(log.path)
    lines[2], lines[3] = lines[3], lines[2]
    _write(log.path, lines)
    report = verify(log.path)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "reordered" in report.problem


def test_wrong_key_is_detected(mvm_home: Path, tmp_path: Path) -> None:
    log = _log()
    other = Ed25519PrivateKey.generate().public_key()
    report = verify(log.path, other)
    assert (report.ok, report.first_bad_seq) == (False, 1)
    assert "wrong key" in report.problem
    # an entry re-signed by another key is reported as such even under the right key id
    lines = _lines(log.path)
    entry = json.loads(lines[4])
    entry["sig"] = sign(Ed25519PrivateKey.generate(), audit.SIG_DOMAIN, entry["hash"].encode())
    lines[4] = canonical_json(entry) + b"\n"
    _write(log.path, lines)
    report = verify(log.path, host_public_key())
    assert (report.ok, report.first_bad_seq) == (False, 5)


def test_entries_from_another_sandbox_are_detected(mvm_home: Path) -> None:
    a = _log("sb-a", 2)
    b = _log("sb-b", 3)
    lines_a, lines_b = _lines(a.path), _lines(b.path)
    _write(a.path, [*lines_a, lines_b[2]])  # b's seq 3 appended to a's log
    report = verify(a.path)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "prev_hash" in report.problem
    _write(a.path, lines_b)  # b's whole log passed off as a's
    report = verify(a.path, sandbox_id="sb-a")
    assert (report.ok, report.first_bad_seq) == (False, 1)
    assert "belongs to sandbox 'sb-b'" in report.problem


def _append_many(path: str, count: int, tag: int) -> None:
    log = AuditLog(path, sandbox_id="sb-conc")
    for i in range(count):
        log.append("command.run", {"n": i}, details={"worker": tag, "i": i})


def test_concurrent_appends_from_processes_and_threads_keep_a_valid_chain(mvm_home: Path) -> None:
    path = audit.log_path("sb-conc")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), 40, w)) for w in range(4)]
    for p in procs:
        p.start()
    shared = AuditLog(path, sandbox_id="sb-conc")
    threads = [threading.Thread(target=lambda: [shared.append("file.read", {"t": i}) for i in range(15)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = verify(path)
    assert report.ok, report.problem
    assert report.entries == 4 * 40 + 4 * 15
    entries = tail(path, 1000)
    assert [e["seq"] for e in entries] == list(range(1, 221))
    index = [json.loads(line) for line in (mvm_home / "audit" / "index.jsonl").read_bytes().splitlines()]
    assert sorted(r["audit_id"] for r in index) == sorted(e["audit_id"] for e in entries)


def test_find_tail_follow(mvm_home: Path) -> None:
    a = _log("sb-a", 3)
    b = _log("sb-b", 5)
    target = tail(b.path, 5)[1]
    found = find(target["audit_id"])
    assert found == target and found["sandbox_id"] == "sb-b" and found["seq"] == 2
    (mvm_home / "audit" / "index.jsonl").unlink()  # the index is a cache: logs are scanned
    assert find(tail(a.path, 1)[0]["audit_id"])["sandbox_id"] == "sb-a"
    with pytest.raises(AuditEntryNotFound):
        find("aud_" + "0" * 28)
    with pytest.raises(InvalidArgument) as info:
        find("nope")
    assert info.value.field == "audit_id"

    assert [e["seq"] for e in tail(b.path, 2)] == [4, 5]
    assert tail(mvm_home / "audit" / "none.jsonl") == []
    got: list[dict] = []

    def later() -> None:
        time.sleep(0.3)
        for _ in range(3):
            b.append("port.forward", {"port": 80})

    threading.Thread(target=later).start()
    for entry in follow(b.path, last=2, poll_interval=0.05, timeout=10):
        got.append(entry)
        if len(got) == 5:
            break
    assert [e["seq"] for e in got] == [4, 5, 6, 7, 8]
    assert got[-1]["op"] == "port.forward"


def test_torn_tail_is_cut_and_chain_stays_valid(mvm_home: Path) -> None:
    log = _log(n=3)
    with open(log.path, "ab") as fh:
        fh.write(b'{"v":1,"seq":4,"audit')  # a crash mid-append
    assert not verify(log.path).ok
    fresh = AuditLog.for_sandbox("sb-1")
    entry = fresh.append("sandbox.destroy")
    assert entry["seq"] == 4
    assert verify(log.path).ok


def test_append_validates_and_redacts(mvm_home: Path) -> None:
    log = AuditLog.for_sandbox("sb-1")
    with pytest.raises(InvalidArgument) as info:
        log.append("bad op name!")
    assert info.value.field == "op"
    with pytest.raises(InvalidArgument) as info:
        log.append("x", outcome="maybe")
    assert info.value.field == "outcome"
    with pytest.raises(InvalidArgument) as info:
        log.append("x", details={"blob": "y" * 5000})
    assert info.value.field == "details"
    with pytest.raises(InvalidArgument):
        AuditLog.for_sandbox("../escape")
    entry = log.append("command.run", outcome="error", error_type="CommandTimeout",
                       details={"note": "token tok-abcdef leaked"}, redactor=Redactor({"tok": "tok-abcdef"}))
    assert entry["details"] == {"note": "token [redacted:tok] leaked"}
    assert entry["error_type"] == "CommandTimeout" and entry["seq"] == 1
    assert b"tok-abcdef" not in log.path.read_bytes()
    assert verify(log.path).ok


def test_deferred_entries_are_made_durable_by_one_shared_fdatasync(mvm_home: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``append(durable=False)`` writes the entry (chained, readable) without syncing;
    ``make_durable(seq)`` syncs once for every entry written before it (group commit) and
    not again for an entry already covered. Counted at the syscall: each fdatasync's file."""
    log = AuditLog.for_sandbox("sb-1")
    synced: list[str] = []
    real_fdatasync = audit.os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        synced.append(audit.os.readlink(f"/proc/self/fd/{fd}"))
        real_fdatasync(fd)

    monkeypatch.setattr(audit.os, "fdatasync", counting_fdatasync)
    first = log.append("exec.run", {"argv": ["true"]}, durable=False)
    second = log.append("exec.run", {"argv": ["false"]}, durable=False)
    assert synced == [] and verify(log.path).entries == 2  # written and chained, not yet synced
    log.make_durable(first["seq"])
    assert synced == [str(log.path)]
    log.make_durable(second["seq"])  # written before that fdatasync: already covered
    log.make_durable(first["seq"])
    assert synced == [str(log.path)]
    log.append("sandbox.destroy", {})  # durable (the default): synced in append, as before
    assert len(synced) == 2
    third = log.append("exec.run", {"argv": ["true"]}, durable=False)
    log.make_durable(third["seq"])
    assert len(synced) == 3 and log.verify().ok


def test_concurrent_waiters_share_the_deferred_sync(mvm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many threads appending and waiting at once: every one returns with its entry
    covered, the chain verifies, and fewer fdatasyncs run than entries were written."""
    log = AuditLog.for_sandbox("sb-2")
    calls = 0
    real_fdatasync = audit.os.fdatasync

    def slow_fdatasync(fd: int) -> None:  # a journal commit's time, so waiters pile up
        nonlocal calls
        calls += 1
        time.sleep(0.02)
        real_fdatasync(fd)

    monkeypatch.setattr(audit.os, "fdatasync", slow_fdatasync)
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()
        for _ in range(5):
            log.make_durable(log.append("exec.run", {"argv": ["true"]}, durable=False)["seq"])

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verify(log.path).entries == 40 and log._durable_seq == 40
    assert calls < 40
