"""sandbox.files on every backend."""

from __future__ import annotations

import asyncio
import os

import pytest

import mvm
from mvm import errors
from waiting import wait_for

TEMPLATE = "python-3.13"


def test_write_read_text_and_bytes(sandbox: mvm.Sandbox) -> None:
    entry = sandbox.files.write("/work/input.json", b"{}")
    assert entry.size == 2 and entry.type == "file"
    assert sandbox.files.read("/work/input.json") == b"{}"
    sandbox.files.write("/work/t.txt", "héllo")
    assert sandbox.files.read_text("/work/t.txt") == "héllo"


def test_write_creates_parents_and_sets_mode(sandbox: mvm.Sandbox) -> None:
    sandbox.files.write("/deep/a/b/c/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert sandbox.files.stat("/deep/a/b/c/run.sh").mode & 0o777 == 0o755
    assert sandbox.commands.run(["/deep/a/b/c/run.sh"]).stdout == "ran\n"


def test_large_file_round_trip(sandbox: mvm.Sandbox) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    sandbox.files.write("/tmp/big.bin", data)
    assert sandbox.files.stat("/tmp/big.bin").size == len(data)
    assert sandbox.files.read("/tmp/big.bin") == data


def test_a_pipelined_write_that_fills_the_disk_fails_whole_and_leaves_nothing(backend: str) -> None:
    """A window of chunks is in flight when the disk fills: the write raises the agent's
    ENOSPC error, the old file stays as it was, no temporary file is left, and the same
    handle works on (the window was drained before the abort). Namespace only: filling a
    TCG VM's disk costs too much suite time for the same client-side path."""
    if backend != "namespace":
        pytest.skip("the client-side window is the same on every backend")
    with mvm.Sandbox.create(TEMPLATE, backend=backend, ttl="5m",
                            resources=mvm.resources(memory_mb=512, rootfs_size_mb=64)) as small:
        small.files.write("/srv/kept.bin", b"old")
        with pytest.raises(errors.TooLarge):
            small.files.write("/srv/kept.bin", os.urandom(80 * 1024 * 1024))
        assert small.files.read("/srv/kept.bin") == b"old"
        assert [e.name for e in small.files.list("/srv")] == ["kept.bin"]
        data = os.urandom(3 * 1024 * 1024 + 5)
        small.files.write("/srv/after.bin", data)
        assert small.files.read("/srv/after.bin") == data


def test_read_is_bounded_by_max_bytes(sandbox: mvm.Sandbox) -> None:
    sandbox.files.write("/tmp/ten-k", b"x" * 10_000)
    with pytest.raises(errors.TooLarge):
        sandbox.files.read("/tmp/ten-k", max_bytes=1000)
    assert len(sandbox.files.read("/tmp/ten-k", max_bytes=10_000)) == 10_000


def test_list_stat_mkdir_move_remove(sandbox: mvm.Sandbox) -> None:
    sandbox.files.mkdir("/work/listing/sub")
    sandbox.files.write("/work/listing/a.txt", "a")
    sandbox.files.write("/work/listing/b.txt", "bb")
    entries = sandbox.files.list("/work/listing")
    assert [(e.name, e.type) for e in entries] == [("a.txt", "file"), ("b.txt", "file"), ("sub", "dir")]
    assert all(isinstance(e, mvm.FileEntry) for e in entries)
    sandbox.files.move("/work/listing/a.txt", "/work/listing/sub/a2.txt")
    assert sandbox.files.read("/work/listing/sub/a2.txt") == b"a"
    assert not sandbox.files.exists("/work/listing/a.txt")
    sandbox.files.remove("/work/listing/b.txt")
    assert [e.name for e in sandbox.files.list("/work/listing")] == ["sub"]
    with pytest.raises(errors.DirectoryNotEmpty):
        sandbox.files.remove("/work/listing")
    sandbox.files.remove("/work/listing", recursive=True)
    assert not sandbox.files.exists("/work/listing")


def test_errors_name_the_path(sandbox: mvm.Sandbox) -> None:
    with pytest.raises(mvm.FileNotFoundInSandbox) as info:
        sandbox.files.read("/no/such/file")
    assert info.value.path == "/no/such/file"
    # the builtin exceptions catch them too, with the path in the message
    with pytest.raises(FileNotFoundError, match="/no/such/file"):
        sandbox.files.read("/no/such/file")
    with pytest.raises(IsADirectoryError, match="/etc"):
        sandbox.files.read("/etc")
    with pytest.raises(PermissionError, match="/etc/passwd"):
        sandbox.commands.run(["/etc/passwd"])
    sandbox.files.write("/tmp/plain", "x")
    with pytest.raises(mvm.NotADirectory):
        sandbox.files.list("/tmp/plain")
    with pytest.raises(mvm.InvalidArgument, match="path"):
        sandbox.files.read("relative/path")


def test_move_refuses_to_overwrite_unless_asked(sandbox: mvm.Sandbox) -> None:
    sandbox.files.write("/tmp/m1", "1")
    sandbox.files.write("/tmp/m2", "2")
    with pytest.raises(errors.FileExistsInSandbox):
        sandbox.files.move("/tmp/m1", "/tmp/m2")
    sandbox.files.move("/tmp/m1", "/tmp/m2", overwrite=True)
    assert sandbox.files.read("/tmp/m2") == b"1"


def test_file_ops_are_audited_without_their_content(sandbox: mvm.Sandbox) -> None:
    from mvm.security.audit import log_path, tail, verify

    entry = sandbox.files.write("/tmp/audited", "audit-content-canary")
    assert entry.size == len("audit-content-canary")
    entries = tail(log_path(sandbox.id), 20)
    writes = [e for e in entries if e["op"] == "fs.write"]
    assert writes and writes[-1]["outcome"] == "ok" and writes[-1]["sandbox_id"] == sandbox.id
    assert "audit-content-canary" not in log_path(sandbox.id).read_text()
    assert any(e.source == "audit" and e.message.startswith("fs.write ok") for e in sandbox.logs())
    assert verify(log_path(sandbox.id)).ok


def _audited(sandbox: mvm.Sandbox, op: str) -> list[dict[str, object]]:
    from mvm.security.audit import log_path, tail

    return [e for e in tail(log_path(sandbox.id), 100_000) if e.get("op") == op]


def test_a_64_mib_file_streams_back_whole_and_is_audited_once(sandbox: mvm.Sandbox) -> None:
    import hashlib

    data = os.urandom(64 * 1024 * 1024)
    sandbox.files.write("/tmp/sixty-four.bin", data)
    before = len(_audited(sandbox, "fs.read"))
    got = sandbox.files.read("/tmp/sixty-four.bin", max_bytes=len(data))
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    reads = _audited(sandbox, "fs.read")
    assert len(reads) == before + 1, "one audit entry per read, not one per chunk"
    assert reads[-1]["outcome"] == "ok" and reads[-1]["details"] == {"size": len(data)}
    sandbox.files.remove("/tmp/sixty-four.bin")


def test_failed_reads_name_the_path_send_nothing_and_are_audited_once_each(sandbox: mvm.Sandbox) -> None:
    sandbox.files.write("/tmp/three-mib", b"y" * (3 * 1024 * 1024))
    before = len(_audited(sandbox, "fs.read"))
    with pytest.raises(mvm.FileNotFoundInSandbox, match="/tmp/absent") as missing:
        sandbox.files.read("/tmp/absent")
    assert missing.value.path == "/tmp/absent"
    with pytest.raises(errors.IsADirectory, match="/tmp") as directory:
        sandbox.files.read("/tmp")
    assert directory.value.path == "/tmp"
    with pytest.raises(errors.TooLarge, match="/tmp/three-mib") as over:  # known size: refused up front
        sandbox.files.read("/tmp/three-mib", max_bytes=2 * 1024 * 1024)
    assert over.value.details == {"path": "/tmp/three-mib", "max_bytes": 2 * 1024 * 1024, "size": 3 * 1024 * 1024}
    with pytest.raises(errors.TooLarge, match="/proc/self/status"):  # a size the guest does not know: counted
        sandbox.files.read("/proc/self/status", max_bytes=64)
    with pytest.raises(errors.TooLarge, match="/dev/zero"):  # endless: stopped once past the limit
        sandbox.files.read("/dev/zero", max_bytes=3 * 1024 * 1024)
    with pytest.raises(mvm.InvalidArgument, match="max_bytes"):
        sandbox._client().call("fs.read", {"path": "/tmp/three-mib", "max_bytes": 0})
    failed = _audited(sandbox, "fs.read")[before:]
    assert [(e["outcome"], e.get("error_type")) for e in failed] == [
        ("error", "FileNotFound"), ("error", "IsADirectory"), ("error", "TooLarge"), ("error", "TooLarge"),
        ("ok", None),
    ], "/dev/zero was opened (and recorded) before it ran over; the bad max_bytes never reached the guest"
    assert sandbox.files.read("/tmp/three-mib", max_bytes=3 * 1024 * 1024) == b"y" * (3 * 1024 * 1024)
def test_files_as_a_guest_user_have_its_permissions_and_ownership(sandbox: mvm.Sandbox) -> None:
    sandbox.files.write("/tmp/root-only-file", "root's", mode=0o600)
    with pytest.raises(mvm.PermissionDenied) as denied:
        sandbox.files.read("/tmp/root-only-file", user="nobody")
    assert denied.value.path == "/tmp/root-only-file" and isinstance(denied.value, PermissionError)
    with pytest.raises(mvm.PermissionDenied):
        sandbox.files.write("/tmp/root-only-file", "overwritten", user="nobody")
    assert sandbox.files.read("/tmp/root-only-file") == b"root's"  # without user=: root, as before

    big = os.urandom(2 * 1024 * 1024 + 5)  # more than one frame: fs.write_begin/chunk/end as the user
    sandbox.files.write("/tmp/by-nobody/sub/small.txt", "mine", user="nobody")
    sandbox.files.write("/tmp/by-nobody/sub/big.bin", big, user="nobody")
    assert sandbox.files.read("/tmp/by-nobody/sub/big.bin", user="nobody") == big
    owners = sandbox.commands.run(["stat", "-c", "%U %a %n", "/tmp/by-nobody", "/tmp/by-nobody/sub",
                                   "/tmp/by-nobody/sub/small.txt", "/tmp/by-nobody/sub/big.bin"])
    assert owners.stdout.splitlines() == ["nobody 755 /tmp/by-nobody", "nobody 755 /tmp/by-nobody/sub",
                                          "nobody 644 /tmp/by-nobody/sub/small.txt",
                                          "nobody 644 /tmp/by-nobody/sub/big.bin"]
    # its own read-only file: refused to it (as `>` would be), not to root
    sandbox.commands.run(["chmod", "a-w", "/tmp/by-nobody/sub/small.txt"], user="nobody", check=True)
    with pytest.raises(mvm.PermissionDenied, match=r"small\.txt"):
        sandbox.files.write("/tmp/by-nobody/sub/small.txt", "again", user="nobody")
    sandbox.files.write("/tmp/by-nobody/sub/small.txt", "again")
    assert sandbox.files.read_text("/tmp/by-nobody/sub/small.txt", user="nobody") == "again"

    # directory ops too: stat/list/mkdir/move/remove check the user's rights
    assert sandbox.commands.run(["stat", "-c", "%a", "/root"]).stdout == "700\n"
    with pytest.raises(mvm.PermissionDenied):
        sandbox.files.list("/root", user="nobody")
    with pytest.raises(mvm.PermissionDenied):
        sandbox.files.mkdir("/root/by-nobody", user="nobody")
    with pytest.raises(mvm.PermissionDenied):
        sandbox.files.move("/tmp/root-only-file", "/tmp/by-nobody/taken", user="nobody")  # /tmp is sticky
    sandbox.files.move("/tmp/by-nobody/sub/big.bin", "/tmp/by-nobody/big.bin", user="nobody")
    assert [e.name for e in sandbox.files.list("/tmp/by-nobody", user="nobody")] == ["big.bin", "sub"]
    assert sandbox.files.stat("/tmp/by-nobody/big.bin", user="nobody").size == len(big)
    sandbox.files.remove("/tmp/by-nobody", recursive=True, user="nobody")
    assert not sandbox.files.exists("/tmp/by-nobody")
    sandbox.files.remove("/tmp/root-only-file")


def test_streamed_reads_leave_no_file_open_in_the_guest(sandbox: mvm.Sandbox) -> None:
    """A streamed read keeps its file open in the agent between chunks (one open, one
    child for ``user``): it is closed at the end, after a refusal too."""
    data = os.urandom(3 * 1024 * 1024 + 1)
    sandbox.files.write("/tmp/held.bin", data)
    assert sandbox.files.read("/tmp/held.bin", user="nobody") == data
    assert sandbox.files.read("/tmp/held.bin") == data
    with pytest.raises(errors.TooLarge):  # the size says so: refused at the first chunk
        sandbox.files.read("/tmp/held.bin", max_bytes=1024 * 1024, user="nobody")

    def holders() -> str:
        listing = ["sh", "-c", "ls -l /proc/[0-9]*/fd/ 2>/dev/null | grep -c /tmp/held.bin"]
        return sandbox.commands.run(listing).stdout.strip()

    wait_for(lambda: holders() == "0", "every read handle of /tmp/held.bin closed in the guest")
    sandbox.files.remove("/tmp/held.bin")


def test_files_name_an_unknown_user_as_commands_do(sandbox: mvm.Sandbox) -> None:
    with pytest.raises(mvm.UserNotFound) as from_command:
        sandbox.commands.run(["id"], user="no-such-account")
    for call in (lambda: sandbox.files.read("/etc/hostname", user="no-such-account"),
                 lambda: sandbox.files.write("/tmp/never", "x", user="no-such-account"),
                 lambda: sandbox.files.list("/tmp", user="no-such-account")):
        with pytest.raises(mvm.UserNotFound) as from_files:
            call()
        assert str(from_files.value) == str(from_command.value) and from_files.value.field == "user"
    assert not sandbox.files.exists("/tmp/never")
    with pytest.raises(mvm.InvalidArgument, match="user: '' is not a user name"):
        sandbox.files.stat("/tmp", user="")


def test_async_files_act_as_a_guest_user(sandbox: mvm.Sandbox) -> None:
    async def scenario() -> None:
        handle = await mvm.AsyncSandbox.connect(sandbox.name)
        try:
            await handle.files.write("/tmp/async-root-only", "root's", mode=0o600)
            with pytest.raises(mvm.PermissionDenied):
                await handle.files.read("/tmp/async-root-only", user="nobody")
            await handle.files.write("/tmp/async-by-nobody.txt", "mine", user="nobody")
            owner = await handle.commands.run(["stat", "-c", "%U", "/tmp/async-by-nobody.txt"])
            assert owner.stdout == "nobody\n"
            with pytest.raises(mvm.UserNotFound):
                await handle.files.stat("/tmp", user="no-such-account")
            await handle.files.remove("/tmp/async-by-nobody.txt", user="nobody")
            await handle.files.remove("/tmp/async-root-only")
        finally:
            await handle.close()

    asyncio.run(scenario())
