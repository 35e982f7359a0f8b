from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

import mvm
from mvm import snapshots
from mvm.errors import InvalidArgument, SnapshotNotFound, SnapshotTampered
from mvm.security.canonical import canonical_json
from mvm.security.keys import host_signing_key, sign
from mvm.snapshots import Snapshot, SnapshotStore, verify_snapshot
from mvm.snapshots import manifest as snapshot_manifest
from mvm.snapshots import store as snapshot_store

from .conftest import files_under, mode

CHUNK = 4096


def _files(root: Path) -> Path:
    src = root / "work" / "artifacts"
    (src / "disk").mkdir(parents=True)
    (src / "memory.img").write_bytes(os.urandom(CHUNK * 4 + 123))
    (src / "disk" / "overlay.qcow2").write_bytes(os.urandom(CHUNK * 4 + 123))  # same size on purpose
    (src / "state.json").write_text('{"pc": 1}')
    return src


def _store() -> SnapshotStore:
    return SnapshotStore(chunk_size=CHUNK)


def _no_leftovers(store: SnapshotStore) -> None:
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


def test_create_list_get_restore(mvm_home: Path) -> None:
    src = _files(mvm_home)
    store = _store()
    seen: list[tuple[int, int]] = []
    info = store.create("before-install", "sb-1", "full", src, expires="24h", details={"qemu": "9.0"},
                        progress=lambda done, total: seen.append((done, total)))
    assert info.id.startswith("snap_") and info.name == "before-install" and info.kind == "full"
    assert info.files == ("disk/overlay.qcow2", "memory.img", "state.json")
    assert info.plain_bytes == sum(p.stat().st_size for p in files_under(src))
    assert info.size_bytes > info.plain_bytes
    assert info.expires_at is not None and abs(info.expires_at - info.created_at - 86400) < 1
    assert info.details == {"qemu": "9.0"} and not info.keep
    assert seen and seen[-1] == (info.plain_bytes, info.plain_bytes)
    wire = info.to_wire()
    assert json.loads(json.dumps(wire)) == wire and 0 <= info.age_seconds() < 60
    # one type on every layer: what the store returns is what the SDK reads off the wire
    assert mvm.Snapshot is Snapshot and Snapshot.from_wire(wire) == info
    assert Snapshot.from_wire(wire).details == info.details and Snapshot.from_wire(wire).files == info.files

    snap_dir = mvm_home / "snapshots" / info.id
    assert mode(mvm_home / "snapshots") == 0o700 and mode(snap_dir) == 0o700 and mode(snap_dir / "blobs") == 0o700
    assert all(mode(p) == 0o600 for p in files_under(snap_dir))
    assert mode(mvm_home / "keys" / "snapshot.key") == 0o600
    secret = (src / "state.json").read_bytes()
    assert all(secret not in p.read_bytes() for p in files_under(snap_dir))

    assert [i.id for i in store.list()] == [info.id]
    assert store.get("before-install") == store.get(info.id) == info
    assert store.verify(info.id).id == info.id

    out = store.open_for_restore("before-install")
    try:
        assert out.parent == mvm_home / "snapshots" and mode(out) == 0o700
        for rel in info.files:
            assert (out / rel).read_bytes() == (src / rel).read_bytes()
            assert mode(out / rel) == 0o600
        assert mode(out / "disk") == 0o700
    finally:
        shutil.rmtree(out)
    _no_leftovers(store)


def test_names_expiry_defaults_and_validation(mvm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _files(mvm_home)
    store = _store()
    default = store.create("a", "sb-1", "filesystem", src, files=["state.json"])
    assert default.files == ("state.json",)
    assert abs(default.expires_at - default.created_at - 7 * 86400) < 1
    monkeypatch.setenv("MVM_SNAPSHOT_EXPIRES", "30m")
    assert abs((e := store.create("b", "sb-1", "full", src)).expires_at - e.created_at - 1800) < 1
    assert store.create("c", "sb-1", "full", src, expires="never").expires_at is None
    with pytest.raises(InvalidArgument) as info:
        store.create("a", "sb-1", "full", src)
    assert info.value.field == "name" and "already has" in str(info.value)
    store.create("a", "sb-2", "full", src)  # another sandbox may reuse the name
    with pytest.raises(InvalidArgument) as info:
        store.get("a")
    assert "several" in str(info.value)
    assert store.get("a", sandbox_id="sb-2").sandbox_id == "sb-2"
    for kwargs, field in [({"name": "bad/name"}, "name"), ({"name": "snap_x"}, "name"), ({"kind": "Full!"}, "kind"),
                          ({"expires": "soon"}, "expires"), ({"expires": 0}, "expires"),
                          ({"files": ["../etc/passwd"]}, "files"), ({"files": ["nope"]}, "files"),
                          ({"files_dir": mvm_home / "missing"}, "files_dir"), ({"details": {"n": 2**60}}, "details")]:
        args = dict(name="x", sandbox_id="sb-1", kind="full", files_dir=src) | kwargs
        with pytest.raises(InvalidArgument) as info:
            store.create(**args)
        assert info.value.field == field, kwargs
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(InvalidArgument) as info:
        store.create("y", "sb-1", "full", src)
    assert "symlink" in str(info.value)
    with pytest.raises(SnapshotNotFound):
        store.get("nope")
    with pytest.raises(SnapshotNotFound):
        store.get("snap_0000000000000000")
    assert len(store.list()) == 4 and len(store.list(sandbox_id="sb-2")) == 1
    _no_leftovers(store)


def test_prune_remove_and_destroy_sparing_keep(mvm_home: Path) -> None:
    src = _files(mvm_home)
    store = _store()
    now = time.time()
    short = store.create("short", "sb-1", "full", src, expires="1h", now=now)
    long_ = store.create("long", "sb-1", "full", src, expires="2d", now=now)
    kept = store.create("kept", "sb-1", "full", src, expires="1h", keep=True, now=now)
    kept_long = store.create("kept-long", "sb-1", "full", src, expires="2d", keep=True, now=now)
    other = store.create("other", "sb-2", "full", src, expires="never", now=now)

    assert store.prune(now + 60) == []
    with pytest.raises(SnapshotNotFound, match="expired"):
        store.open_for_restore(short.id, now=now + 7200)
    pruned = store.prune(datetime.fromtimestamp(now + 7200, UTC))
    assert sorted(i.name for i in pruned) == ["kept", "short"]  # keep does not outlive expiry
    for gone in (short, kept):
        assert not store.path(gone).exists()
        with pytest.raises(SnapshotNotFound):
            store.get(gone.id)

    removed = store.remove_for_sandbox("sb-1")  # what destroy does
    assert [i.name for i in removed] == ["long"]
    assert {i.name for i in store.list()} == {"kept-long", "other"}

    assert store.remove("other") == other.id
    assert not store.path(other).exists()
    remaining = [p for p in (mvm_home / "snapshots").rglob("*") if other.id in str(p)]
    assert remaining == [], "remove left files behind"
    with pytest.raises(SnapshotNotFound):
        store.remove(other.id)
    assert [i.id for i in store.list()] == [kept_long.id]
    _no_leftovers(store)
    del long_


def test_prune_sweeps_interrupted_work(mvm_home: Path) -> None:
    store = _store()
    dead = store.root / ".staging-snap_0123456789abcdef-999999999"
    (dead / "blobs").mkdir(parents=True)
    (dead / "blobs" / "000000.sealed").write_bytes(b"x")
    alive = store.root / f".restore-snap_0123456789abcdef-{os.getpid()}-abc"
    alive.mkdir()
    store.prune()
    assert not dead.exists() and alive.exists()


# ---- tampering: every way is refused before anything is unsealed ------------------------


def _resign(snap_dir: Path, edit) -> None:
    manifest = json.loads((snap_dir / "manifest.json").read_text())
    manifest.pop("signature")
    edit(manifest)
    manifest["signature"] = {"alg": "ed25519", "key_id": "ignored",
                             "sig": sign(host_signing_key(), snapshots.SIG_DOMAIN, canonical_json(manifest))}
    from mvm.security.keys import key_id

    manifest["signature"]["key_id"] = key_id(host_signing_key())
    (snap_dir / "manifest.json").write_text(json.dumps(manifest))


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x80
    path.write_bytes(bytes(raw))


def _swap_chunks(path: Path) -> None:
    raw = path.read_bytes()
    h, c = snapshots.HEADER_SIZE, CHUNK + snapshots.TAG_SIZE
    path.write_bytes(raw[:h] + raw[h + c:h + 2 * c] + raw[h:h + c] + raw[h + 2 * c:])


def _swap_files(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def _edit_manifest(d: Path) -> None:
    text = (d / "manifest.json").read_text()
    m = json.loads(text)
    m["expires_at"] = None
    (d / "manifest.json").write_text(json.dumps(m))


TAMPERINGS = {
    "flip a byte": (lambda d: _flip(d / "blobs" / "000001.sealed", 5000), "000001.sealed (memory.img)"),
    "truncate": (lambda d: os.truncate(d / "blobs" / "000001.sealed", snapshots.HEADER_SIZE + CHUNK + 16),
                 "000001.sealed"),
    "swap two chunks": (lambda d: _swap_chunks(d / "blobs" / "000000.sealed"), "000000.sealed"),
    "swap two files": (lambda d: _swap_files(d / "blobs" / "000000.sealed", d / "blobs" / "000001.sealed"),
                       "000000.sealed"),
    "change manifest": (_edit_manifest, "manifest.json"),
    "delete manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json"),
    "missing file": (lambda d: (d / "blobs" / "000002.sealed").unlink(), "000002.sealed (state.json)"),
    "added file": (lambda d: (d / "blobs" / "extra").write_bytes(b"x"), "blobs/extra"),
    "forged manifest with another key": (
        lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text().replace('"ed25519:', '"ed25519:f')), "manifest.json"),
}


@pytest.mark.parametrize("how", list(TAMPERINGS))
def test_tampered_snapshot_is_refused_naming_the_file(mvm_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                      how: str) -> None:
    src = _files(mvm_home)
    store = _store()
    info = store.create("s", "sb-1", "full", src, expires="1h")
    tamper, names = TAMPERINGS[how]
    tamper(store.path(info))
    unsealed: list[object] = []
    monkeypatch.setattr(snapshot_store, "unseal_file", lambda *a, **k: unsealed.append(a))
    with pytest.raises(SnapshotTampered) as exc:
        store.open_for_restore(info.id)
    assert names in str(exc.value), str(exc.value)
    assert exc.value.details["file"].removeprefix("blobs/") in names
    assert unsealed == [], "bytes were unsealed before the snapshot was verified"
    with pytest.raises(SnapshotTampered):
        verify_snapshot(store.path(info))
    _no_leftovers(store)
    assert store.remove(info.id) == info.id  # a tampered snapshot can still be deleted
    assert not store.path(info).exists()


def test_swapped_directories_are_refused(mvm_home: Path) -> None:
    src = _files(mvm_home)
    store = _store()
    a = store.create("a", "sb-1", "full", src, expires="1h")
    b = store.create("b", "sb-1", "full", src, expires="1h")
    tmp = store.path(a).with_name("x")
    store.path(a).rename(tmp)
    store.path(b).rename(store.path(a))
    tmp.rename(store.path(b))
    with pytest.raises(SnapshotTampered, match="directories swapped"):
        store.open_for_restore(a.id)
    assert set(store.problems()) == {a.id, b.id} and store.list() == []


def test_swapped_blobs_are_caught_by_authentication_even_with_a_forged_manifest(mvm_home: Path) -> None:
    """Defence in depth: with the signing key stolen (manifest re-signed to match the
    swapped files), the per-file AEAD context still refuses them."""
    src = _files(mvm_home)
    store = _store()
    info = store.create("s", "sb-1", "full", src, expires="1h")
    blobs = store.path(info) / "blobs"
    _swap_files(blobs / "000000.sealed", blobs / "000001.sealed")

    def swap_hashes(m: dict) -> None:
        f0, f1 = m["files"][0], m["files"][1]
        f0["sealed_sha256"], f1["sealed_sha256"] = f1["sealed_sha256"], f0["sealed_sha256"]

    _resign(store.path(info), swap_hashes)
    verify_snapshot(store.path(info))  # the forged manifest itself checks out
    with pytest.raises(SnapshotTampered) as exc:
        store.open_for_restore(info.id)
    assert "000000.sealed (disk/overlay.qcow2)" in str(exc.value) and "authentication" in str(exc.value)
    _no_leftovers(store)


def test_a_restore_reads_and_verifies_the_manifest_once(mvm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store()
    info = store.create("s", "sb-1", "full", _files(mvm_home), expires="1h")
    reads: list[Path] = []
    real = snapshot_manifest.read_manifest

    def counting(directory: Path, public_key: object = None) -> snapshots.Manifest:
        reads.append(directory)
        return real(directory, public_key)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot_manifest, "read_manifest", counting)
    monkeypatch.setattr(snapshot_store, "read_manifest", counting)
    for ref in (info.id, "s"):  # by id, and by name (which reads the manifests to find it)
        reads.clear()
        with store.restoring(ref, stream=["memory.img"]) as opened:
            assert opened.source("memory.img") is not None
            assert (opened.path / "state.json").read_text() == '{"pc": 1}'
        assert reads == [store.path(info)], reads
