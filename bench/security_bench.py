"""Cost of mvm's security layer, as ratios against baselines measured in the same run.

* sealing: seal + unseal of a 256 MiB file (AES-256-GCM, 1 MiB chunks) against a plain
  copy there and back (``shutil.copyfile``); restore also pays a sha256 verify pass.
* audit: one signed, hash-chained, flock'd, fdatasync'd append against an unsigned
  JSON-lines append (with and without fdatasync).

    .venv/bin/python bench/security_bench.py [--size-mib 256] [--entries 2000] [--dir DIR]

Runs in a throw-away MVM_HOME; prints a table and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_sealing(work: Path, size_mib: int, repeat: int) -> None:
    from mvm.snapshots import seal_file, snapshot_key, unseal_file

    key = snapshot_key()
    src = work / "plain.img"
    with open(src, "wb") as fh:  # incompressible content: no shortcut for either side
        block = os.urandom(1 << 20)
        for i in range(size_mib):
            fh.write(hashlib.sha256(block[:64] + i.to_bytes(4, "big")).digest() + block[32:])
    sealed, out, copy1, copy2 = (work / n for n in ("sealed.img", "unsealed.img", "copy1.img", "copy2.img"))

    def plain() -> None:
        shutil.copyfile(src, copy1)
        shutil.copyfile(copy1, copy2)

    def seal() -> None:
        seal_file(src, sealed, key, context=b"bench", fsync=False)

    def verify() -> None:
        with open(sealed, "rb") as fh:
            hashlib.file_digest(fh, "sha256")

    def unseal() -> None:
        unseal_file(sealed, out, key, context=b"bench")

    plain()  # warm the page cache for both sides
    best: dict[str, float] = {}
    for _ in range(repeat):  # interleaved rounds, best of each
        for label, fn in (("copy", plain), ("seal", seal), ("verify", verify), ("unseal", unseal)):
            best[label] = min(best.get(label, float("inf")), _timed(fn))
    t_copy, t_seal, t_verify, t_unseal = best["copy"], best["seal"], best["verify"], best["unseal"]
    mib = float(size_mib)
    print(f"sealing ({size_mib} MiB file, page cache warm, no fsync on either side; best of {repeat})")
    print(f"  plain copy there + back        {t_copy:7.3f} s   {2 * mib / t_copy:8.0f} MiB/s")
    print(f"  seal                           {t_seal:7.3f} s   {mib / t_seal:8.0f} MiB/s")
    print(f"  verify (sha256 of sealed file) {t_verify:7.3f} s   {mib / t_verify:8.0f} MiB/s")
    print(f"  unseal                         {t_unseal:7.3f} s   {mib / t_unseal:8.0f} MiB/s")
    print(f"  ratio seal+unseal / plain copy            {(t_seal + t_unseal) / t_copy:6.2f}x")
    print(f"  ratio seal+verify+unseal / plain copy     {(t_seal + t_verify + t_unseal) / t_copy:6.2f}x")
    for p in (src, sealed, out, copy1, copy2):
        p.unlink(missing_ok=True)


def bench_audit(work: Path, entries: int, rounds: int = 5) -> None:
    from mvm.security.audit import AuditLog
    from mvm.security.canonical import canonical_json, sha256_hex
    from mvm.security.keys import host_signing_key, sign

    args = {"argv": ["python", "-c", "print(1)"], "cwd": "/app", "env_keys": ["PATH", "API_KEY"]}
    details = {"exit_code": 0, "duration_ms": 12.5}
    per_round = max(1, entries // rounds)
    durable = AuditLog(work / "sb-bench.jsonl", sandbox_id="sb-bench")
    no_sync = AuditLog(work / "sb-bench-nosync.jsonl", sandbox_id="sb-bench-nosync", fsync=False)
    key = host_signing_key()
    durable.append("warmup")
    no_sync.append("warmup")

    def audited(log: AuditLog) -> float:
        t0 = time.perf_counter()
        for _ in range(per_round):
            log.append("command.run", args, details=details)
        return (time.perf_counter() - t0) / per_round

    def plain(sync: bool) -> float:
        with open(work / f"plain-{sync}.jsonl", "ab") as fh:
            t0 = time.perf_counter()
            for i in range(per_round):
                fh.write(json.dumps({"ts": time.time(), "op": "command.run", "args": args, "details": details,
                                     "i": i}).encode() + b"\n")
                fh.flush()
                if sync:
                    os.fdatasync(fh.fileno())
            return (time.perf_counter() - t0) / per_round

    def crypto() -> float:
        entry = {"v": 1, "op": "command.run", "args": args, "details": details, "seq": 1, "prev_hash": "0" * 64}
        t0 = time.perf_counter()
        for _ in range(per_round):
            sign(key, b"mvm-audit-v1", sha256_hex(canonical_json(entry)).encode())
        return (time.perf_counter() - t0) / per_round

    samples: dict[str, list[float]] = {"plain": [], "plain_sync": [], "audit": [], "audit_nosync": [], "crypto": []}
    for _ in range(rounds):  # interleaved, so disk/CPU noise hits every variant alike
        samples["plain"].append(plain(False))
        samples["plain_sync"].append(plain(True))
        samples["audit"].append(audited(durable))
        samples["audit_nosync"].append(audited(no_sync))
        samples["crypto"].append(crypto())
    m = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    print(f"audit append ({per_round * rounds} entries per variant, {rounds} interleaved rounds, median)")
    print(f"  plain JSON-lines append, no fsync             {m['plain']:8.1f} µs/entry")
    print(f"  plain JSON-lines append + fdatasync           {m['plain_sync']:8.1f} µs/entry")
    print(f"  AuditLog.append, no fsync (CPU cost)          {m['audit_nosync']:8.1f} µs/entry")
    print(f"    of which canonical JSON + sha256 + Ed25519  {m['crypto']:8.1f} µs")
    print(f"  AuditLog.append (signed, chained, flock, fdatasync, index)  {m['audit']:8.1f} µs/entry")
    print(f"  ratio AuditLog / plain append (both no fsync)         {m['audit_nosync'] / m['plain']:7.1f}x")
    print(f"  ratio AuditLog / plain append + fdatasync (durable)   {m['audit'] / m['plain_sync']:7.2f}x")
    print(f"  added cost per audited operation (durable vs plain)   {(m['audit'] - m['plain']) / 1000:7.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir under cwd)")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mvm-security-bench-", dir=ns.dir or os.getcwd()) as tmp:
        work = Path(tmp)
        os.environ["MVM_HOME"] = str(work / "home")
        bench_audit(work, ns.entries)
        print()
        bench_sealing(work, ns.size_mib, ns.repeat)


if __name__ == "__main__":
    main()
