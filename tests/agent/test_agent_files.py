"""fs.*: reads, atomic and chunked writes, listings, and every error type with its path."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_harness import SYSTEM_PYTHON, AgentClient, AgentProcess, installed_agent_command
from mvm.agent.files import MAX_WRITE_HANDLES, PendingTemps, _temp_path
from mvm.protocol.codec import CHUNK_SIZE

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def _read_all(agent: AgentClient, path: str) -> bytes:
    data = b""
    while True:
        result, chunk = agent.call_with_payload("fs.read", path=path, offset=len(data), length=CHUNK_SIZE)
        data += chunk
        if result["eof"]:
            assert result["size"] == len(data)
            return data


def test_write_then_read_round_trips_bytes(agent: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    payload = bytes(range(256)) * 10
    assert agent.call("fs.write", payload, path=str(target)) == {"size": len(payload)}
    assert target.read_bytes() == payload
    result, data = agent.call_with_payload("fs.read", path=str(target))
    assert data == payload and result == {"size": len(payload), "eof": True}


def test_read_honours_offset_and_length(agent: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "abc"
    target.write_bytes(b"0123456789")
    result, data = agent.call_with_payload("fs.read", path=str(target), offset=2, length=3)
    assert (data, result) == (b"234", {"size": 10, "eof": False})
    result, data = agent.call_with_payload("fs.read", path=str(target), offset=7, length=3)
    assert (data, result["eof"]) == (b"789", True)
    result, data = agent.call_with_payload("fs.read", path=str(target), offset=50, length=3)
    assert (data, result["eof"]) == (b"", True)


def test_a_kept_open_read_is_opened_once_and_read_by_its_handle(agent: AgentClient) -> None:
    """A streamed read opens its file once (as the user: one child, not one per chunk):
    the next chunks read the open file by handle, even after the user lost the right to
    open it; the handle ends with fs.read_close."""
    directory = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        directory.chmod(0o755)
        target = directory / "kept"
        data = os.urandom(2 * CHUNK_SIZE + 7)
        target.write_bytes(data)
        target.chmod(0o644)
        result, first = agent.call_with_payload("fs.read", path=str(target), keep_open=True, user="nobody")
        handle = result["handle"]
        target.chmod(0o600)  # nobody could not open it again
        assert agent.error("fs.read", path=str(target), user="nobody")["type"] == "PermissionDenied"
        rest = [agent.send_request("fs.read", {"handle": handle, "offset": offset})  # in flight together
                for offset in (CHUNK_SIZE, 2 * CHUNK_SIZE)]
        frames = [agent.response(ident) for ident in rest]
        assert first + b"".join(frame.payload for frame in frames) == data
        assert [frame.header["result"]["eof"] for frame in frames] == [False, True]
        assert agent.call("fs.read_close", handle=handle) == {"closed": True}
        assert agent.error("fs.read", handle=handle)["field"] == "handle"
        assert agent.call("fs.read_close", handle=handle) == {"closed": False}
        small = directory / "small"
        small.write_bytes(b"whole")
        result, whole = agent.call_with_payload("fs.read", path=str(small), keep_open=True)
        assert whole == b"whole" and "handle" not in result, "a read that reached the end keeps nothing open"
    finally:
        shutil.rmtree(directory)


def test_files_whose_size_is_unknown_are_read_until_a_short_read(agent: AgentClient) -> None:
    result, data = agent.call_with_payload("fs.read", path="/proc/self/status", length=16)
    assert len(data) == 16 and result == {"size": 0, "eof": False}
    result, data = agent.call_with_payload("fs.read", path="/proc/self/status")
    assert b"Pid:" in data and result["eof"] is True


def test_sync_flushes_without_error(agent: AgentClient, tmp_path: Path) -> None:
    agent.call("fs.write", b"durable", path=str(tmp_path / "f"))
    assert agent.call("fs.sync") == {}


def test_a_read_longer_than_a_chunk_is_refused(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    error = agent.error("fs.read", path=str(tmp_path / "f"), length=CHUNK_SIZE + 1)
    assert error["type"] == "InvalidArgument" and error["field"] == "length"


def test_new_files_get_mode_0644_or_the_requested_mode(agent: AgentClient, tmp_path: Path) -> None:
    agent.call("fs.write", b"a", path=str(tmp_path / "default"))
    agent.call("fs.write", b"#!/bin/sh\n", path=str(tmp_path / "script"), mode=0o755)
    assert stat.S_IMODE((tmp_path / "default").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "script").stat().st_mode) == 0o755


def test_overwriting_keeps_an_existing_files_mode_unless_told_otherwise(agent: AgentClient, tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("old")
    script.chmod(0o750)
    agent.call("fs.write", b"new", path=str(script))
    assert script.read_bytes() == b"new" and stat.S_IMODE(script.stat().st_mode) == 0o750


def test_write_replaces_atomically_and_leaves_no_temp_file(agent: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.write_text("old contents")
    old_inode = target.stat().st_ino
    with open(target) as reader_of_old_version:
        agent.call("fs.write", b"new contents", path=str(target))
        assert reader_of_old_version.read() == "old contents", "readers of the old file are undisturbed"
    assert target.read_bytes() == b"new contents"
    assert target.stat().st_ino != old_inode, "a new file was renamed into place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config"]


def test_append_adds_to_the_end(agent: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "log"
    assert agent.call("fs.write", b"one\n", path=str(target), append=True) == {"size": 4}
    assert agent.call("fs.write", b"two\n", path=str(target), append=True) == {"size": 8}
    assert target.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_make_parents_creates_missing_directories(agent: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.txt"
    error = agent.error("fs.write", b"x", path=str(target))
    assert error["type"] == "FileNotFound" and error["path"] == str(target)
    agent.call("fs.write", b"x", path=str(target), make_parents=True)
    assert target.read_bytes() == b"x"


def test_writing_through_a_symlink_writes_its_target(agent: AgentClient, tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    (tmp_path / "link.txt").symlink_to("real.txt")
    agent.call("fs.write", b"new", path=str(tmp_path / "link.txt"))
    assert (tmp_path / "link.txt").is_symlink() and real.read_bytes() == b"new"


def test_five_mib_upload_in_chunks_round_trips(agent: AgentClient, tmp_path: Path) -> None:
    payload = os.urandom(5 * 1024 * 1024 + 99)
    target = tmp_path / "big" / "blob.bin"
    handle = agent.call("fs.write_begin", path=str(target), make_parents=True, mode=0o600)["handle"]
    for offset in range(0, len(payload), CHUNK_SIZE):
        agent.call("fs.write_chunk", payload[offset : offset + CHUNK_SIZE], handle=handle)
    assert not target.exists(), "nothing appears at the target before write_end"
    assert agent.call("fs.write_end", handle=handle, commit=True)["size"] == len(payload)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert hashlib.sha256(_read_all(agent, str(target))).digest() == hashlib.sha256(payload).digest()
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]


def test_pipelined_chunks_are_written_in_order(agent: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "ordered"
    handle = agent.call("fs.write_begin", path=str(target))["handle"]
    pieces = [bytes([n]) * 1000 for n in range(64)]
    idents = [agent.send_request("fs.write_chunk", {"handle": handle}, piece) for piece in pieces]
    for ident in idents:
        assert agent.response(ident).header["ok"]
    agent.call("fs.write_end", handle=handle)
    assert target.read_bytes() == b"".join(pieces)


def test_chunks_naming_their_offset_land_there_in_any_order(agent: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "placed"
    handle = agent.call("fs.write_begin", path=str(target))["handle"]
    pieces = [bytes([n]) * 1000 for n in range(16)]
    idents = [agent.send_request("fs.write_chunk", {"handle": handle, "offset": 1000 * n}, pieces[n])
              for n in reversed(range(16))]  # as a supervisor's threads may deliver a window
    for ident in idents:
        assert agent.response(ident).header["ok"]
    assert agent.call("fs.write_end", handle=handle)["size"] == 16_000
    assert target.read_bytes() == b"".join(pieces)
    handle = agent.call("fs.write_begin", path=str(target))["handle"]
    assert agent.error("fs.write_chunk", b"x", handle=handle, offset=-1)["field"] == "offset"
    agent.call("fs.write_end", handle=handle, commit=False)


def test_an_aborted_upload_leaves_nothing_behind(agent: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "aborted"
    handle = agent.call("fs.write_begin", path=str(target))["handle"]
    agent.call("fs.write_chunk", b"partial", handle=handle)
    assert agent.call("fs.write_end", handle=handle, commit=False)["committed"] is False
    assert list(tmp_path.iterdir()) == []
    assert agent.error("fs.write_chunk", b"more", handle=handle)["field"] == "handle"


def test_a_new_agent_process_never_reuses_a_dead_agents_handle_numbers(
        spawn_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """A restarted agent is a new process: its write and read handles must not name the ones
    the dead agent gave out, or a chunk the host sent to the old write that arrives after
    the restart would land in a new write (docs/reliability.md, "Agent restart")."""
    (tmp_path / "big").write_bytes(os.urandom(2 * CHUNK_SIZE))
    given: list[set[int]] = []
    for _agent in range(2):
        client = spawn_agent().client()
        writes = {client.call("fs.write_begin", path=str(tmp_path / f"w{n}"))["handle"] for n in range(3)}
        read = client.call_with_payload("fs.read", path=str(tmp_path / "big"), length=CHUNK_SIZE,
                                        keep_open=True)[0]["handle"]
        given.append(writes | {read})
        assert len(given[-1]) == 4, given  # (one numbering for writes and reads)
    old, new = given
    assert not old & new, given
    error = client.error("fs.write_chunk", b"a chunk for the dead agent's write", handle=min(old), offset=0)
    assert error["field"] == "handle" and "no open write handle" in error["message"], error


def test_open_write_handles_are_bounded(agent: AgentClient, tmp_path: Path) -> None:
    handles = [agent.call("fs.write_begin", path=str(tmp_path / f"f{n}"))["handle"]
               for n in range(MAX_WRITE_HANDLES)]
    error = agent.error("fs.write_begin", path=str(tmp_path / "one-too-many"))
    assert error["type"] == "InvalidState" and str(MAX_WRITE_HANDLES) in error["message"]
    agent.call("fs.write_end", handle=handles[0], commit=False)
    agent.call("fs.write_begin", path=str(tmp_path / "now-fits"))


def test_list_describes_files_dirs_and_symlinks(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_bytes(b"12345")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to("file.txt")
    os.mkfifo(tmp_path / "fifo")
    entries = agent.call("fs.list", path=str(tmp_path))["entries"]
    by_name = {e["name"]: e for e in entries}
    assert [e["name"] for e in entries] == ["fifo", "file.txt", "link", "sub"]
    assert by_name["file.txt"]["type"] == "file" and by_name["file.txt"]["size"] == 5
    assert by_name["file.txt"]["path"] == str(tmp_path / "file.txt")
    assert by_name["file.txt"]["mode"] == stat.S_IMODE((tmp_path / "file.txt").stat().st_mode)
    assert by_name["file.txt"]["mtime"] == pytest.approx((tmp_path / "file.txt").stat().st_mtime)
    assert by_name["sub"]["type"] == "dir"
    assert by_name["link"]["type"] == "symlink" and by_name["link"]["symlink_target"] == "file.txt"
    assert by_name["fifo"]["type"] == "other"
    assert "symlink_target" not in by_name["file.txt"]


def test_a_huge_directory_is_listed_in_pages(agent: AgentClient, tmp_path: Path) -> None:
    for n in range(1500):
        (tmp_path / f"file-with-a-longish-name-{n:05d}.txt").touch()
    names: list[str] = []
    offset = 0
    while True:
        page = agent.call("fs.list", path=str(tmp_path), offset=offset)
        names += [e["name"] for e in page["entries"]]
        assert page["total"] == 1500
        if not page.get("truncated"):
            break
        offset = page["next_offset"]
    assert names == sorted(p.name for p in tmp_path.iterdir())


def test_stat_describes_one_entry_without_following_symlinks(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to("/no/such/target")
    entry = agent.call("fs.stat", path=str(tmp_path / "dangling"))
    assert entry["type"] == "symlink" and entry["symlink_target"] == "/no/such/target"
    assert agent.call("fs.stat", path="/")["name"] == "/"


def test_mkdir_creates_directories_with_parents_and_mode(agent: AgentClient, tmp_path: Path) -> None:
    agent.call("fs.mkdir", path=str(tmp_path / "one"))
    assert (tmp_path / "one").is_dir()
    agent.call("fs.mkdir", path=str(tmp_path / "a" / "b" / "c"), parents=True, mode=0o700)
    assert stat.S_IMODE((tmp_path / "a" / "b" / "c").stat().st_mode) == 0o700
    agent.call("fs.mkdir", path=str(tmp_path / "a"), parents=True)  # like mkdir -p: fine if it exists
    error = agent.error("fs.mkdir", path=str(tmp_path / "one"))
    assert error["type"] == "FileExists" and error["path"] == str(tmp_path / "one")
    error = agent.error("fs.mkdir", path=str(tmp_path / "x" / "y"))
    assert error["type"] == "FileNotFound"


def test_remove_deletes_files_and_directories(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full" / "deep").mkdir(parents=True)
    (tmp_path / "full" / "deep" / "file").write_text("x")
    agent.call("fs.remove", path=str(tmp_path / "f"))
    agent.call("fs.remove", path=str(tmp_path / "empty"))
    error = agent.error("fs.remove", path=str(tmp_path / "full"))
    assert error["type"] == "DirectoryNotEmpty" and error["path"] == str(tmp_path / "full")
    agent.call("fs.remove", path=str(tmp_path / "full"), recursive=True)
    assert list(tmp_path.iterdir()) == []


def test_removing_a_symlink_to_a_directory_removes_only_the_link(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep").write_text("x")
    (tmp_path / "link").symlink_to("dir")
    agent.call("fs.remove", path=str(tmp_path / "link"), recursive=True)
    assert (tmp_path / "dir" / "keep").exists() and not (tmp_path / "link").exists()


def test_remove_refuses_the_root_directory(agent: AgentClient) -> None:
    assert agent.error("fs.remove", path="/", recursive=True)["type"] == "InvalidArgument"


def test_move_renames_and_refuses_to_overwrite_unless_asked(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    error = agent.error("fs.move", src=str(tmp_path / "a"), dst=str(tmp_path / "b"))
    assert error["type"] == "FileExists" and error["path"] == str(tmp_path / "b")
    agent.call("fs.move", src=str(tmp_path / "a"), dst=str(tmp_path / "b"), overwrite=True)
    assert (tmp_path / "b").read_text() == "A" and not (tmp_path / "a").exists()
    agent.call("fs.move", src=str(tmp_path / "b"), dst=str(tmp_path / "c"))
    assert (tmp_path / "c").read_text() == "A"
    error = agent.error("fs.move", src=str(tmp_path / "nope"), dst=str(tmp_path / "d"))
    assert error["type"] == "FileNotFound" and error["path"] == str(tmp_path / "nope")


def test_move_across_file_systems_copies_and_removes(agent: AgentClient, tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system")
    source = other / f"mvm-agent-test-{os.getpid()}"
    try:
        (source / "inner").mkdir(parents=True)
        (source / "inner" / "f").write_text("payload")
        agent.call("fs.move", src=str(source), dst=str(tmp_path / "moved"))
        assert (tmp_path / "moved" / "inner" / "f").read_text() == "payload"
        assert not source.exists()
    finally:
        shutil.rmtree(source, ignore_errors=True)


@pytest.mark.parametrize("op, args, error_type", [
    ("fs.read", {"path": "{tmp}/missing"}, "FileNotFound"),
    ("fs.read", {"path": "{tmp}"}, "IsADirectory"),
    ("fs.read", {"path": "{tmp}/file/below"}, "NotADirectory"),
    ("fs.write", {"path": "{tmp}"}, "IsADirectory"),
    ("fs.write", {"path": "{tmp}/file/child"}, "NotADirectory"),
    ("fs.write_begin", {"path": "{tmp}/missing/child"}, "FileNotFound"),
    ("fs.list", {"path": "{tmp}/file"}, "NotADirectory"),
    ("fs.list", {"path": "{tmp}/missing"}, "FileNotFound"),
    ("fs.stat", {"path": "{tmp}/missing"}, "FileNotFound"),
    ("fs.mkdir", {"path": "{tmp}/file"}, "FileExists"),
    ("fs.mkdir", {"path": "{tmp}/file/sub", "parents": True}, "NotADirectory"),
    ("fs.remove", {"path": "{tmp}/missing"}, "FileNotFound"),
    ("fs.move", {"src": "{tmp}/file", "dst": "{tmp}/missing/x"}, "FileNotFound"),
])
def test_errors_carry_their_type_and_the_path(agent: AgentClient, tmp_path: Path, op: str, args: dict,
                                              error_type: str) -> None:
    (tmp_path / "file").write_text("x")
    args = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in args.items()}
    error = agent.error(op, b"", **args)
    assert error["type"] == error_type, error
    assert error["path"] in args.values()


@pytest.mark.parametrize("op, field", [("fs.read", "path"), ("fs.write", "path"), ("fs.list", "path"),
                                       ("fs.stat", "path"), ("fs.mkdir", "path"), ("fs.remove", "path"),
                                       ("fs.write_begin", "path"), ("fs.move", "src")])
def test_relative_paths_are_InvalidArgument_naming_the_field(agent: AgentClient, op: str, field: str) -> None:
    error = agent.error(op, **{field: "relative/path", "dst": "/tmp/x"})
    assert error["type"] == "InvalidArgument" and error["field"] == field


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root, setpriv and a system python3")
def test_permission_problems_are_PermissionDenied(spawn_agent, tmp_path: Path) -> None:
    # An agent running as "nobody": root's files are off limits.
    command = installed_agent_command(tmp_path / "install")
    area = Path(tempfile.mkdtemp(prefix="mvm-agent-perm-"))
    try:
        area.chmod(0o755)
        secret = area / "secret"
        secret.write_text("x")
        secret.chmod(0o600)
        agent = spawn_agent(prefix=NOBODY, command=command).client()
        assert agent.run(["id", "-u"]).stdout.strip() == b"65534"
        for op, args in [("fs.read", {"path": str(secret)}), ("fs.write", {"path": str(area / "new")}),
                         ("fs.write", {"path": str(secret)}), ("fs.mkdir", {"path": str(area / "dir")}),
                         ("fs.remove", {"path": str(secret)}), ("fs.list", {"path": "/root"})]:
            error = agent.error(op, **args)
            assert error["type"] == "PermissionDenied", (op, error)
            assert error["path"] == args["path"]
    finally:
        shutil.rmtree(area, ignore_errors=True)


def test_the_temp_files_of_a_dead_agents_writes_are_removed_by_the_next_agent(tmp_path: Path) -> None:
    """``PendingTemps`` as two agent lifetimes see it: the first notes its writes' temp files
    and dies without a word; the next removes those (and only those, only as notes of ours
    name them), while a finished write's note is already gone."""
    notes = tmp_path / "notes"
    work = tmp_path / "work"
    work.mkdir()
    first = PendingTemps()
    assert first.enable(str(notes)) == 0
    assert stat.S_IMODE(notes.stat().st_mode) == 0o700
    cut = [_temp_path(str(work / f"big{n}")) for n in range(3)]
    finished = _temp_path(str(work / "done"))
    for temp in [*cut, finished]:
        Path(temp).write_bytes(b"part of a write")
        first.add(temp)
    os.replace(finished, work / "done")
    first.remove(finished)
    # notes that are not ours name files that must stay
    keep = work / "precious"
    keep.write_bytes(b"not a temp file")
    (notes / "0123456789ab").write_bytes(os.fsencode(str(keep)))
    stranger = _temp_path(str(work / "stranger"))
    Path(stranger).write_bytes(b"a temp file this note does not name by its token")
    (notes / "ba9876543210").write_bytes(os.fsencode(stranger))

    assert PendingTemps().enable(str(notes)) == 3
    assert sorted(p.name for p in work.iterdir()) == sorted(["done", "precious", os.path.basename(stranger)])
    assert list(notes.iterdir()) == []


def test_a_cut_move_across_file_systems_leaves_no_copy_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A move across file systems copies to a temp beside its target first; the agent notes
    that temp before the copy (itself, not in a user's child), so an agent killed mid-copy
    has the next one remove the partial copy -- a directory tree, a file or a link."""
    from mvm.agent import files
    from mvm.agent.errors import Args

    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system")
    notes = tmp_path / "notes"
    pending = PendingTemps()
    pending.enable(str(notes))
    monkeypatch.setattr(files, "PENDING", pending)
    source = other / f"mvm-agent-test-{os.getpid()}"
    noted: list[str] = []
    real_copytree = shutil.copytree

    def copy_then_look(*args: object, **kwargs: object) -> object:
        result = real_copytree(*args, **kwargs)  # type: ignore[arg-type]
        noted.extend(os.fsdecode((notes / n).read_bytes()) for n in os.listdir(notes))
        return result

    monkeypatch.setattr(files.shutil, "copytree", copy_then_look)
    try:
        (source / "inner").mkdir(parents=True)
        (source / "inner" / "f").write_text("payload")
        files.Files().move(Args({"src": str(source), "dst": str(tmp_path / "moved")}))
    finally:
        shutil.rmtree(source, ignore_errors=True)
    assert noted and {os.path.dirname(n) for n in noted} == {str(tmp_path)}, noted  # the copy's temp, noted
    assert (tmp_path / "moved" / "inner" / "f").read_text() == "payload" and list(notes.iterdir()) == []

    # what a killed agent leaves: copies cut short, noted; the next agent removes them all
    work = tmp_path / "work"
    work.mkdir()
    cut_dir = _temp_path(str(work / "tree"))
    Path(cut_dir, "inner").mkdir(parents=True)
    Path(cut_dir, "inner", "f").write_text("part")
    cut_link = _temp_path(str(work / "link"))
    os.symlink(str(tmp_path / "moved"), cut_link)  # a link's copy: removed, never followed
    for temp in (cut_dir, cut_link):
        pending.add(temp)
    assert PendingTemps().enable(str(notes)) == 2
    assert list(work.iterdir()) == [] and (tmp_path / "moved" / "inner" / "f").exists()


def test_pending_temps_are_not_kept_in_a_directory_that_is_not_the_agents_own(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    pending = PendingTemps()
    temp = tmp_path / ".x.mvm-0123456789ab.tmp"
    temp.write_bytes(b"")
    (shared / "0123456789ab").write_bytes(os.fsencode(str(temp)))
    assert pending.enable(str(shared)) == 0  # refused: group/other may write there
    pending.add(str(tmp_path / ".y.mvm-ba9876543210.tmp"))
    assert temp.exists() and sorted(p.name for p in shared.iterdir()) == ["0123456789ab"]
