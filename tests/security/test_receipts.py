from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mvm.errors import InvalidArgument
from mvm.security.canonical import canonical_json
from mvm.security.receipts import read_receipt, verify_receipt, write_receipt

from .conftest import mode


def _receipt(directory: Path, **overrides: object) -> Path:
    now = time.time()
    args: dict = dict(sandbox_id="sb-1", template="python-3.13", template_digest="sha256:" + "ab" * 32,
                      argv=["python", "-c", "print('hi')"], env_keys=["API_KEY", "PATH", "API_KEY"],
                      exit_code=0, stdout=b"hi\n", stderr=b"", started_at=now - 0.5, ended_at=now,
                      audit_id="aud_0123456789abcdef0123", truncated=False)
    args.update(overrides)
    return write_receipt(directory, **args)


def test_canonical_json_is_rfc8785() -> None:
    assert canonical_json({"b": [1, 2.5, "é"], "a": None, "c": {"z": True, "y": 1e21}}) == (
        '{"a":null,"b":[1,2.5,"é"],"c":{"y":1e+21,"z":true}}'.encode())
    with pytest.raises(InvalidArgument):
        canonical_json({"n": 2**60})


def test_receipt_round_trip(mvm_home: Path) -> None:
    path = _receipt(mvm_home / "receipts")
    assert verify_receipt(path) == (True, None)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    r = read_receipt(path)
    assert r["argv"]["sha256"] == "sha256:" + hashlib.sha256(
        canonical_json(["python", "-c", "print('hi')"])).hexdigest()
    assert r["env_keys"] == ["API_KEY", "PATH"]
    assert r["exit_code"] == 0
    assert r["stdout"] == {"sha256": "sha256:" + hashlib.sha256(b"hi\n").hexdigest(), "size": 3}
    assert r["stderr"]["size"] == 0 and r["truncated"] == {"stdout": False, "stderr": False}
    assert r["sandbox_id"] == "sb-1" and r["template"]["name"] == "python-3.13"
    assert r["audit_id"] == "aud_0123456789abcdef0123"
    assert 490 <= r["duration_ms"] <= 510
    assert r["signature"]["alg"] == "ed25519"
    text = path.read_text()
    assert "print('hi')" not in text and "hi\\n" not in text  # digests, not contents
    ok, problem = verify_receipt(path, stdout=b"hi\n", stderr=b"", argv=["python", "-c", "print('hi')"])
    assert ok, problem
    ok, problem = verify_receipt(path, stdout=b"other")
    assert not ok and "stdout" in problem


def test_receipt_options(mvm_home: Path) -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    path = _receipt(mvm_home, filename="run.json", started_at=when, ended_at="2025-01-02T03:04:06Z",
                    truncated={"stdout": True}, exit_code=None)
    assert path == mvm_home / "run.json"
    r = read_receipt(path)
    assert r["started_at"] == "2025-01-02T03:04:05.000000Z" and r["duration_ms"] == 1000.0
    assert r["truncated"] == {"stdout": True, "stderr": False} and r["exit_code"] is None
    assert verify_receipt(path).ok
    with pytest.raises(InvalidArgument):
        _receipt(mvm_home, filename="../x.json")
    with pytest.raises(InvalidArgument):
        _receipt(mvm_home, exit_code="0")


@pytest.mark.parametrize("edit", [
    lambda r: r.update(exit_code=1),
    lambda r: r["stdout"].update(size=4),
    lambda r: r["env_keys"].append("SECRET"),
    lambda r: r.update(sandbox_id="sb-2"),
    lambda r: r["signature"].update(sig=r["signature"]["sig"][::-1]),
    lambda r: r.pop("signature"),
])
def test_edited_receipt_is_detected(mvm_home: Path, edit) -> None:
    path = _receipt(mvm_home)
    r = json.loads(path.read_text())
    edit(r)
    path.write_text(json.dumps(r))
    ok, problem = verify_receipt(path)
    assert not ok and problem


def test_receipt_wrong_key_and_garbage(mvm_home: Path) -> None:
    path = _receipt(mvm_home)
    ok, problem = verify_receipt(path, Ed25519PrivateKey.generate().public_key())
    assert not ok and "wrong key" in problem
    path.write_text("not json")
    assert not verify_receipt(path).ok
    assert verify_receipt(mvm_home / "missing.json") == (False, f"no receipt at {mvm_home / 'missing.json'}")


def test_canonical_object_matches_canonical_json() -> None:
    from mvm.security.canonical import canonical_object

    obj = {"z": [1, "é\n"], "a": {"k": None}, "m": 2.5, "hash": "ab", "key_id": "x"}
    assert canonical_object({k: canonical_json(v) for k, v in obj.items()}) == canonical_json(obj)


def test_verifying_without_any_host_key_says_so(mvm_home: Path) -> None:
    from mvm.security.audit import verify

    signer = Ed25519PrivateKey.generate()
    path = _receipt(mvm_home, signer=signer)
    assert verify_receipt(path, signer.public_key()).ok
    ok, problem = verify_receipt(path)
    assert not ok and "no signing key" in problem
    report = verify(mvm_home / "none.jsonl")
    assert not report.ok and "no signing key" in report.problem
    assert not (mvm_home / "keys" / "audit-ed25519.key").exists()


def test_prune_removes_only_old_receipts_by_their_own_name(mvm_home: Path) -> None:
    """``prune_receipts`` removes the receipts written before the cutoff (file mtime), keeps
    the newer ones and any file not named as ``write_receipt`` names receipts; a dry run
    counts the same and removes nothing; a bad duration names ``older_than`` first."""
    import os

    from mvm.paths import receipts_dir
    from mvm.security.receipts import prune_receipts

    assert prune_receipts("1d") == (0, 0, 0) and not (mvm_home / "receipts").exists()  # nothing made
    folder = receipts_dir()
    old = [_receipt(folder) for _ in range(3)]
    new = [_receipt(folder) for _ in range(2)]
    named = _receipt(folder, filename="keep-me.json")
    foreign = folder / "notes.txt"
    foreign.write_text("not a receipt")
    month_ago = time.time() - 31 * 86400
    for path in [*old, named, foreign]:
        os.utime(path, (month_ago, month_ago))
    size = sum(p.stat().st_size for p in old)

    with pytest.raises(InvalidArgument) as bad:
        prune_receipts("30 days")
    assert bad.value.field == "older_than" and len(list(folder.iterdir())) == 7
    assert prune_receipts("30d", dry_run=True) == (3, size, 2) and len(list(folder.iterdir())) == 7
    assert prune_receipts("30d") == (3, size, 2)
    assert sorted(folder.iterdir()) == sorted([*new, named, foreign])
    assert all(verify_receipt(p).ok for p in new)
    assert prune_receipts("30d") == (0, 0, 2)


def test_a_receipt_of_output_hashed_as_it_went_is_the_receipt_of_the_bytes(mvm_home: Path) -> None:
    """The supervisor hashes a command's output as it sends it (``StreamDigest``) rather
    than keeping it: the receipt says the same and verifies against the bytes."""
    from mvm.security.receipts import StreamDigest

    folder = mvm_home / "receipts"
    kept = read_receipt(_receipt(folder, stdout=b"hi\n", stderr=b"warn\n"))
    hashed = _receipt(folder, stdout=StreamDigest.of(b"hi\n"), stderr=StreamDigest.of(b"warn\n"))
    assert read_receipt(hashed)["stdout"] == kept["stdout"] and read_receipt(hashed)["stderr"] == kept["stderr"]
    assert verify_receipt(hashed, stdout=b"hi\n", stderr=b"warn\n").ok
    assert not verify_receipt(hashed, stdout=b"ho\n").ok
