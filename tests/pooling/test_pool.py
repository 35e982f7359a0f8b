"""Warm pools (mvm.pool): pre-started namespace sandboxes a create claims.

Real bubblewrap sandboxes and supervisors throughout: a claim applies the create's
name, TTL, env, secrets, tags and on_behalf_of; a create the pool cannot honour starts
its own sandbox; members are handed out once (also under concurrent creators in
several processes), expire unclaimed even when their owner died, and nothing is left
once a pool is closed or has expired. Times are never asserted (bench/ measures them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import mvm
from mvm import errors
from mvm.backends import get_backend, pool_backend_names
from mvm.osutil import pid_alive
from mvm.paths import pools_dir, sandboxes_dir
from mvm.pooling import store
from mvm.security import audit
from mvm.supervisor.state import SUPERVISOR_STAMP, list_sandboxes
from waiting import wait_for

TEMPLATE = "python-3.13"


def _members() -> list[dict[str, object]]:
    """Every pool member still running (claimed or not)."""
    return [r for r in list_sandboxes(pooled=True) if r.get("pool")]


def _nothing_left(pool_id: str, member_ids: list[str], pids: list[int]) -> bool:
    return (not store.pool_dir(pool_id).exists()
            and not any((sandboxes_dir() / member).exists() for member in member_ids)
            and not any(pid_alive(pid) for pid in pids))


def _supervisor_pid(sandbox_id: str) -> int:
    return int(json.loads((sandboxes_dir() / sandbox_id / "state.json").read_text())["supervisor_pid"])


@pytest.fixture
def pool() -> Iterator[mvm.Pool]:
    with mvm.pool(TEMPLATE, size=2, ttl="5m") as made:
        made.wait_ready()
        yield made


def test_a_create_claims_a_member_and_gets_everything_it_asked_for(
    pool: mvm.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = pool.describe().ready
    monkeypatch.setenv("MVM_SECRET_POOL_TOKEN", "s3cr3t-pool-token")
    with mvm.Sandbox.create(TEMPLATE, backend="namespace", name="claimed-one", ttl="7m", workload_id="job-1",
                            env={"MODE": "pooled", "TOKEN": mvm.secret("pool-token")}, tags={"team": "a"},
                            on_behalf_of={"client": "agent-7"}) as sb:
        assert sb.id in waiting  # a pre-started member, not a new sandbox
        info = sb.describe()
        assert info.name == "claimed-one" and info.state == "running" and info.workload_id == "job-1"
        assert info.pool is not None and info.pool["id"] == pool.id and info.pool["claimed_at"] is not None
        assert info.expires_at is not None
        assert abs(info.expires_at - info.details["pool"]["claimed_at"] - 7 * 60) < 5  # TTL from the claim
        assert sorted(info.details["env_keys"]) == ["MODE"] and info.details["secret_env_keys"] == ["TOKEN"]
        result = sb.commands.run(["sh", "-c", "echo $MODE $TOKEN"])
        assert result.stdout.strip() == "pooled [redacted:pool-token]"
        assert mvm.Sandbox.connect("claimed-one").id == sb.id
        # handed out once: it left the pool, which refills with a new member
        wait_for(lambda: len(pool.describe().ready) == 2 and sb.id not in pool.describe().ready, "refill")
        # the supervisor refuses a second claim of the same sandbox
        with pytest.raises(errors.InvalidState):
            sb._client().call("sandbox.claim", {"name": "again"})
    entries = audit.tail(audit.log_path(sb.id), 50)
    ops = [entry["op"] for entry in entries]
    assert ops[:2] == ["sandbox.prestart", "sandbox.create"]
    prestart, create = entries[0], entries[1]
    assert prestart["details"]["pool"] == pool.id
    assert create["details"]["pool"] == pool.id and create["details"]["prestart_audit_id"] == prestart["audit_id"]
    assert create["actor"]["pid"] == os.getpid()  # claimed by this process ...
    assert create["actor"]["on_behalf_of"] == {"client": "agent-7"}  # ... acting for this client
    assert audit.verify(audit.log_path(sb.id)).ok


def test_a_create_the_pool_cannot_honour_starts_its_own_sandbox(pool: mvm.Pool) -> None:
    waiting = sorted(pool.describe().ready)
    with mvm.Sandbox.create(TEMPLATE, backend="namespace", resources=mvm.resources(memory_mb=256)) as other:
        assert other.id not in waiting and other.describe().details["pool"] is None
    allow_pypi = mvm.network("allow", allow=["pypi.org:443"])
    with mvm.Sandbox.create(TEMPLATE, backend="namespace", network=allow_pypi) as other:
        assert other.id not in waiting and other.describe().details["pool"] is None
    assert sorted(pool.describe().ready) == waiting
    with pool.create(name="via-the-pool") as sb:  # the pool's own shape: a member
        assert sb.id in waiting
    with pytest.raises(errors.InvalidArgument) as err:
        pool.create(resources=mvm.resources(memory_mb=256))
    assert err.value.field == "resources"


def test_a_claim_applies_auto_pause_and_a_taken_name_consumes_no_member(pool: mvm.Pool) -> None:
    with pool.create(name="naps", auto_pause="1s") as sb:
        info = sb.describe()
        assert info.pool is not None and info.details["auto_pause_seconds"] == 1
        wait_for(lambda: sb.describe().state == "paused", "the claimed sandbox paused when idle")
        assert sb.commands.run(["echo", "awake"]).stdout == "awake\n"  # the next request resumes it
        wait_for(lambda: len(pool.describe().ready) == pool.size, "refill")
        waiting = sorted(pool.describe().ready)
        with pytest.raises(errors.InvalidArgument) as err:
            pool.create(name="naps")
        assert err.value.field == "name"
        assert sorted(pool.describe().ready) == waiting


def test_unclaimed_members_are_not_sandboxes_anyone_can_use(pool: mvm.Pool) -> None:
    member = pool.describe().ready[0]
    assert member not in {info.id for info in mvm.Sandbox.list()}
    with pytest.raises(errors.SandboxNotFound):
        mvm.Sandbox.connect(member)
    # even talking to its socket directly: nothing runs in it before a claim
    from mvm.supervisor.client import SupervisorClient

    client = SupervisorClient(sandboxes_dir() / member / "control.sock")
    try:
        with pytest.raises(errors.InvalidState):
            client.call("exec.run", {"argv": ["true"], "env": {}, "cwd": None, "secret_names": {}})
        assert client.call("sandbox.describe")[0]["state"] == "pooled"
        # what a claimer that cannot hash the template (TypeScript) compares with the pool's digest
        answer = client.call("sandbox.template_digest")[0]
        assert answer == {"template": TEMPLATE, "digest": pool.describe().details["template_digest"]}
        assert answer["digest"] == mvm.templates.ensure_template(TEMPLATE).digest
    finally:
        client.close()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"size": 0}, "size"), ({"size": store.MAX_POOL_SIZE + 1}, "size"), ({"size": "2"}, "size"),
    ({"size": True}, "size"), ({"ttl": None}, "ttl"), ({"ttl": 0}, "ttl"), ({"ttl": "25h"}, "ttl"),
    ({"ttl": "soon"}, "ttl"), ({"backend": "vm"}, "backend"), ({"resources": {"memory_mb": 1}}, "resources"),
])
def test_bad_pool_values_are_refused_naming_the_field_and_leave_nothing(kwargs: dict[str, object], field: str) -> None:
    before = set(os.listdir(pools_dir())), set(os.listdir(sandboxes_dir()))
    with pytest.raises(errors.InvalidArgument) as err:
        mvm.pool(TEMPLATE, **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
    assert (set(os.listdir(pools_dir())), set(os.listdir(sandboxes_dir()))) == before


def test_which_backends_a_pool_pre_starts_is_the_backend_registry_s_answer() -> None:
    # a capability each backend states (Backend.poolable), not a list of names kept by pooling
    assert get_backend("namespace").poolable and not get_backend("vm").poolable
    assert pool_backend_names() == ["namespace"]
    assert store.validate_pool_backend(None) == "namespace"
    with pytest.raises(errors.InvalidArgument) as err:
        store.validate_pool_backend("vm")
    assert (err.value.field, err.value.details["allowed"]) == ("backend", ["namespace"])


def test_the_host_wide_bound_counts_every_pool(pool: mvm.Pool) -> None:
    with mvm.pool(TEMPLATE, size=store.MAX_POOL_SIZE, refill=False) as big:  # one member started, 16 counted
        before = set(os.listdir(sandboxes_dir()))
        with pytest.raises(errors.InvalidArgument) as err:
            mvm.pool(TEMPLATE, size=store.MAX_POOLED - pool.size - big.size + 1)
        assert err.value.field == "size"
        assert err.value.details["allowed"] == f"at most {store.MAX_POOLED - pool.size - big.size}"
        assert sorted(p.id for p in mvm.pools()) == sorted([pool.id, big.id])
        assert set(os.listdir(sandboxes_dir())) == before


def test_concurrent_creators_in_several_processes_never_share_a_member(tmp_path: Path) -> None:
    script = tmp_path / "claim.py"
    script.write_text(
        "import json, sys, mvm\n"
        "sb = mvm.Sandbox.create('python-3.13', backend='namespace', ttl='5m', name=sys.argv[1])\n"
        "print(json.dumps({'id': sb.id, 'pool': (sb.describe().details['pool'] or {}).get('id')}))\n"
        "sb.close()\n"
    )
    with mvm.pool(TEMPLATE, size=4, ttl="5m", refill=False) as made:
        made.fill()
        waiting = set(made.describe().ready)
        procs = [subprocess.Popen([sys.executable, str(script), f"racer-{i}"], stdout=subprocess.PIPE, text=True)
                 for i in range(4)]
        outputs = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
        ids = [out["id"] for out in outputs]
        try:
            assert len(set(ids)) == 4  # four sandboxes, whichever way each create went
            claimed = [out["id"] for out in outputs if out["pool"] == made.id]
            assert claimed and set(claimed) <= waiting
            assert not set(made.describe().ready) & set(claimed)
            for sandbox_id in claimed:  # and each was claimed exactly once
                ops = [e["op"] for e in audit.tail(audit.log_path(sandbox_id), 50)]
                assert ops.count("sandbox.create") == 1
        finally:
            for sandbox_id in ids:
                mvm.Sandbox.connect(sandbox_id).kill()


def test_taking_a_member_is_atomic_between_racers(pool: mvm.Pool) -> None:
    member = pool.describe().ready[0]
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        wins.append(store.take(pool.id, member))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1


def test_closing_a_pool_leaves_nothing_but_the_sandboxes_it_handed_out() -> None:
    made = mvm.pool(TEMPLATE, size=3, ttl="5m")
    made.wait_ready()
    claimed = made.create(name="outlives-its-pool")
    members = made.describe().ready
    pids = [_supervisor_pid(m) for m in members]
    made.close()
    assert _nothing_left(made.id, members, pids)  # close() returns once they are gone
    assert not any(r.get("state") == "pooled" for r in _members())
    assert claimed.commands.run(["true"]).exit_code == 0  # a claimed one is an ordinary sandbox now
    claimed.kill()
    made.close()  # twice is fine


def test_a_member_whose_supervisor_died_is_replaced_and_cleaned_by_the_owner() -> None:
    with mvm.pool(TEMPLATE, size=1, ttl="5m") as made:
        (dead,) = made.wait_ready().ready
        pid = _supervisor_pid(dead)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), "the supervisor died")
        assert dead not in mvm.pools()[0].ready  # a dead member is not reported as waiting
        wait_for(lambda: made.describe().ready not in ([], [dead]), "a replacement member")
        wait_for(lambda: not (sandboxes_dir() / dead).exists(), "the dead member cleaned up")
        with made.create(name="after-a-death") as sb:
            assert sb.id != dead and sb.describe().pool is not None


def test_a_member_whose_supervisor_pid_went_to_another_process_is_pruned_and_that_process_left_alone() -> None:
    """A dead member is judged as discovery judges a sandbox: by its supervisor's pid *and*
    start time. Its pid now belonging to an unrelated process must not keep it listed,
    and pruning it must neither wait for nor kill that process."""
    with mvm.pool(TEMPLATE, size=1, ttl="5m", refill=False) as made:
        (dead,) = made.describe().ready
        directory = sandboxes_dir() / dead
        pid = _supervisor_pid(dead)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), "the supervisor died")
        unrelated = subprocess.Popen(["sleep", "300"])
        try:
            # the stamp the dead supervisor left, as if the kernel had since given its pid to `unrelated`
            start_ticks = (directory / SUPERVISOR_STAMP).read_text().split()[1]
            (directory / SUPERVISOR_STAMP).write_text(f"{unrelated.pid} {start_ticks}")
            record = json.loads((directory / "state.json").read_text())
            (directory / "state.json").write_text(json.dumps({**record, "supervisor_pid": unrelated.pid}))
            assert pid_alive(unrelated.pid)
            assert mvm.pools()[0].ready == []  # not reported as waiting
            made.fill()  # the owner prunes it and starts a replacement
            (replacement,) = made.describe().ready
            assert replacement != dead and not directory.exists()
            assert unrelated.poll() is None  # never killed for the dead member
            with made.create(name="after-a-reused-pid") as sb:
                assert sb.id == replacement
        finally:
            unrelated.kill()
            unrelated.wait()


def test_a_forked_child_exiting_leaves_its_parents_pool_alone(tmp_path: Path) -> None:
    script = tmp_path / "fork.py"
    script.write_text(
        "import os, sys, mvm\n"
        "p = mvm.pool('python-3.13', size=1, ttl='5m')\n"
        "p.wait_ready()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    sys.exit(0)  # runs the atexit hooks it inherited\n"
        "os.waitpid(child, 0)\n"
        "print(len(p.describe().ready), p.closed)\n"
    )  # ... and the parent's own exit closes it
    proc = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "False"]
    assert mvm.pools() == [] and not _members()


def test_members_expire_unclaimed_even_after_their_owner_died(tmp_path: Path) -> None:
    """The owner is killed outright: each member's own supervisor still ends it at its
    TTL, and the last one removes the abandoned pool."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import json, os, sys, mvm\n"
        "p = mvm.pool('python-3.13', size=2, ttl='3s')\n"
        "p.wait_ready()\n"
        "print(json.dumps({'id': p.id, 'members': p.describe().ready}), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == -9
    made = json.loads(proc.stdout)
    wait_for(lambda: not store.pool_dir(made["id"]).exists(), "the abandoned pool removed", timeout=60)
    wait_for(lambda: not any((sandboxes_dir() / m).exists() for m in made["members"]), "members gone", timeout=60)
    for member in made["members"]:
        ops = [e["op"] for e in audit.tail(audit.log_path(member), 50)]
        assert ops == ["sandbox.prestart", "sandbox.destroy"]
        assert audit.verify(audit.log_path(member)).ok


def test_async_creates_claim_members_too(pool: mvm.Pool) -> None:
    waiting = set(pool.describe().ready)

    async def script() -> tuple[str, str | None, str]:
        async with await mvm.AsyncSandbox.create(TEMPLATE, backend="namespace", name="async-claimed") as sb:
            info = await sb.describe()
            result = await sb.commands.run(["echo", "ok"])
            return sb.id, info.details["pool"]["id"], result.stdout

    sandbox_id, pool_id, out = asyncio.run(script())
    assert sandbox_id in waiting and pool_id == pool.id and out == "ok\n"


def test_in_record_mode_a_pool_starts_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mvm.modes.recording import reset_recording

    monkeypatch.setenv("MVM_INCLUDE_BASE", str(tmp_path))
    monkeypatch.setenv("MVM_MODE", "record")
    recording = reset_recording()
    try:
        before = set(os.listdir(pools_dir())), set(os.listdir(sandboxes_dir()))
        with mvm.pool(TEMPLATE, size=3) as recorded:
            assert recorded.recorded and recorded.describe().ready == []
            sb = recorded.create(name="recorded-one")
            assert sb.recorded
            sb.commands.run(["true"])
        assert [e["op"] for e in recording.events] == ["sandbox.create", "commands.run"]
        assert (set(os.listdir(pools_dir())), set(os.listdir(sandboxes_dir()))) == before
        with pytest.raises(errors.InvalidArgument) as err:
            mvm.pool(TEMPLATE, size=0)  # checked alike in every mode
        assert err.value.field == "size"
    finally:
        reset_recording()
