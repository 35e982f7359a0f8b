from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from mvm.errors import InvalidArgument, KeystoreError, SecretNotFound
from mvm.security.secrets import (
    Keystore,
    Redactor,
    SecretRef,
    env_var_for,
    redact_stream,
    resolve_secret,
    secret_available,
)

from .conftest import files_under, mode


def test_keystore_round_trip_and_metadata(mvm_home: Path) -> None:
    ks = Keystore()
    meta = ks.set("api-key", "s3cr3t-value-1")
    assert meta["name"] == "api-key" and meta["created_at"] == meta["updated_at"]
    assert ks.get("api-key") == "s3cr3t-value-1"
    again = ks.set("api-key", "s3cr3t-value-2")
    assert again["created_at"] == meta["created_at"] and again["updated_at"] >= meta["updated_at"]
    assert ks.get("api-key") == "s3cr3t-value-2"
    ks.set("other.token_2", "ünïcødé ✓ value")
    assert Keystore().get("other.token_2") == "ünïcødé ✓ value"
    listed = ks.names()
    assert [n["name"] for n in listed] == ["api-key", "other.token_2"]
    assert all(set(n) == {"name", "created_at", "updated_at"} for n in listed)
    ks.remove("api-key")
    with pytest.raises(SecretNotFound) as info:
        ks.get("api-key")
    assert info.value.name == "api-key"
    with pytest.raises(SecretNotFound):
        ks.remove("api-key")
    assert [n["name"] for n in ks.names()] == ["other.token_2"]


def test_keystore_files_are_private(mvm_home: Path) -> None:
    Keystore().set("db-password", "correct horse battery staple")
    assert mode(mvm_home / "secrets") == 0o700
    assert mode(mvm_home / "keys") == 0o700
    assert mode(mvm_home / "keys" / "secrets.key") == 0o600
    assert len((mvm_home / "keys" / "secrets.key").read_bytes()) == 32
    secret_files = list((mvm_home / "secrets").iterdir())
    assert [p.name for p in secret_files] == ["db-password.secret"]
    assert all(mode(p) == 0o600 for p in secret_files)


def test_canary_value_never_on_disk_in_plain_text(mvm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    ks = Keystore()
    ks.set("canary", canary)
    ks.set("canary", canary)  # the update path too
    monkeypatch.setenv(env_var_for("env-canary"), canary)
    assert resolve_secret("canary") == canary
    assert resolve_secret("env-canary") == canary
    assert secret_available("canary") and secret_available("env-canary")
    assert canary not in repr(ks.names())
    with pytest.raises(SecretNotFound) as info:
        resolve_secret("missing")
    assert canary not in str(info.value)
    files = files_under(mvm_home)
    assert files, "the keystore wrote nothing?"
    needle = canary.encode()
    for path in files:
        data = path.read_bytes()
        assert needle not in data, f"secret value found in plain text in {path}"
        assert canary.encode("utf-16-le") not in data


@pytest.mark.parametrize("name", ["", "a/b", "../x", "with space", "é", "a" * 129, "semi;colon", None, 5])
def test_invalid_secret_names_are_refused(name: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        SecretRef(name)  # type: ignore[arg-type]
    assert info.value.field == "secret name"
    assert "A-Z a-z 0-9 _ . -" in str(info.value.allowed)
    if isinstance(name, str):
        with pytest.raises(InvalidArgument):
            Keystore().set(name, "value")
        with pytest.raises(InvalidArgument):
            resolve_secret(name)


@pytest.mark.parametrize("name", ["a", "API_KEY", "api-key", "svc.token-2", "..", "x" * 128])
def test_valid_secret_names(name: str) -> None:
    assert SecretRef(name).name == name
    assert SecretRef(name) == SecretRef.from_dict(SecretRef(name).to_dict())
    Keystore().set(name, "value-1234")
    assert Keystore().get(name) == "value-1234"


def test_bad_values_are_refused() -> None:
    ks = Keystore()
    for value, word in [("", "empty"), ("a\0b", "NUL"), (b"bytes", "str")]:
        with pytest.raises(InvalidArgument) as info:
            ks.set("x", value)  # type: ignore[arg-type]
        assert info.value.field == "secret value" and word in str(info.value)


def test_swapped_or_edited_secret_files_do_not_decrypt(mvm_home: Path) -> None:
    ks = Keystore()
    ks.set("alpha", "alpha-value")
    ks.set("beta", "beta-value")
    root = mvm_home / "secrets"
    (root / "beta.secret").write_bytes((root / "alpha.secret").read_bytes())
    with pytest.raises(KeystoreError, match="beta"):
        ks.get("beta")
    raw = bytearray((root / "alpha.secret").read_bytes())
    i = raw.index(b'"ciphertext": "') + 20
    raw[i] = ord("A") if raw[i] != ord("A") else ord("B")
    (root / "alpha.secret").write_bytes(bytes(raw))
    with pytest.raises(KeystoreError):
        ks.get("alpha")


def test_resolution_order_and_env_names(monkeypatch: pytest.MonkeyPatch, mvm_home: Path) -> None:
    assert env_var_for("api-key") == "MVM_SECRET_API_KEY"
    assert env_var_for("svc.token-2") == "MVM_SECRET_SVC_TOKEN_2"
    monkeypatch.setenv("MVM_SECRET_API_KEY", "from-env")
    assert resolve_secret("api-key") == "from-env"
    with pytest.raises(SecretNotFound):
        resolve_secret("api-key", environ={})
    assert resolve_secret("api-key", environ={"MVM_SECRET_API_KEY": "explicit"}) == "explicit"
    Keystore().set("api-key", "from-keystore")
    assert resolve_secret("api-key") == "from-keystore"  # keystore first


def test_missing_secret_error_and_plan_check(mvm_home: Path) -> None:
    assert not secret_available("nope")
    assert not (mvm_home / "keys" / "secrets.key").exists()  # checking creates no key
    with pytest.raises(SecretNotFound) as info:
        resolve_secret("nope")
    text = str(info.value)
    assert "nope" in text and "mvmctl secret set nope" in text and "MVM_SECRET_NOPE" in text
    assert info.value.to_wire()["type"] == "SecretNotFound"


# ---- redaction -------------------------------------------------------------------------


def test_redactor_str_and_bytes() -> None:
    r = Redactor({"key": "sk-12345", "long": "sk-12345-extended", "pin": "123"})
    assert r.skipped == ["pin"]
    text = "a sk-12345 b sk-12345-extended c 123"
    assert r.redact(text) == "a [redacted:key] b [redacted:long] c 123"
    assert r.redact(text.encode()) == b"a [redacted:key] b [redacted:long] c 123"
    assert r.redact("nothing here") == "nothing here"
    assert Redactor({}).redact("sk-12345") == "sk-12345"
    assert not Redactor({"short": "abc"})
    assert r.redact_obj({"k": ["x sk-12345", ("sk-12345",)], "n": 3}) == {
        "k": ["x [redacted:key]", ("[redacted:key]",)], "n": 3}


def _stream(r: Redactor, chunks: list) -> str | bytes:
    out = list(redact_stream(chunks, r))
    return ("" if isinstance(chunks[0], str) else b"").join(out)


def test_stream_redaction_handles_values_split_across_chunks() -> None:
    r = Redactor({"a": "SECRETVALUE", "b": "pässwörd-ü", "c": "SECRETVALUE-LONGER", "d": "abab"})
    text = "x SECRETVALUE y pässwörd-ü SECRETVALUE-LONGER ababab SECRETVALU z SECRETVALUE"
    whole = r.redact(text)
    assert "SECRETVALUE" not in whole and "pässwörd" not in whole
    # every single split point, in str and in bytes (which splits inside UTF-8 sequences)
    for data in (text, text.encode()):
        for i in range(len(data) + 1):
            assert _stream(r, [data[:i], data[i:]]) == r.redact(data), i
    # random chunkings, including 1-byte chunks and empty chunks
    rng = random.Random(7)
    for data in (text, text.encode()):
        for _ in range(300):
            cuts = sorted(rng.sample(range(len(data) + 1), rng.randint(1, 12)))
            chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            assert _stream(r, chunks) == r.redact(data)
        assert _stream(r, [data[i:i + 1] for i in range(len(data))]) == r.redact(data)


def test_stream_redactor_holds_back_little() -> None:
    r = Redactor({"k": "0123456789"})
    s = r.stream()
    assert s.feed(b"hello world, no secret here ") == b"hello world, no sec"  # keeps 9 bytes back
    assert s.pending == 9
    assert s.feed(b"0123") + s.feed(b"456789!") + s.flush() == b"ret here [redacted:k]!"
