"""Where mvm keeps its state: ``$MVM_HOME`` (default ``~/.mvm``).

Layout (DESIGN §1)::

    $MVM_HOME/
      sandboxes/<id>/   config.json, launcher, supervisor.pid, state.json, control.sock, logs.jsonl,
                        backend/ (backend-owned); supervisor/state.py says who writes what
      names/<name>      a sandbox name's claim (holds the sandbox id; made exclusively, see state.py)
      pools/<pool_id>/  pool.json (what the warm pool serves, its owner), ready/<sandbox_id> (claimable members)
      audit/            <sandbox_id>.jsonl (signed hash chain, outlives the sandbox), index.jsonl
      receipts/         signed receipts of commands.run
      runs/<run_id>/    what each sandbox of an `mvmctl run --mode live` did (its log)
      templates/        <name>-<digest>/rootfs, rootfs.ext4, manifest.json
      snapshots/        <snapshot-id>/
      cache/            kernels, initramfs, KVM probe verdicts, blank-disks/ (namespace disk images)
      keys/  secrets/   mode 0700 directories, 0600 files
"""

from __future__ import annotations

import os
from pathlib import Path


def mvm_home() -> Path:
    home = Path(os.environ.get("MVM_HOME") or Path.home() / ".mvm")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def _sub(name: str, private: bool = False) -> Path:
    path = mvm_home() / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o755)
    return path


def sandboxes_dir() -> Path:
    return _sub("sandboxes", private=True)


def pools_dir() -> Path:
    """Warm pools of pre-started sandboxes (mvm/pooling)."""
    return _sub("pools", private=True)


def names_dir() -> Path:
    return _sub("names", private=True)


def _shareable(variable: str, name: str) -> Path:
    """``$variable`` if set (a folder several homes share), else ``<home>/name``."""
    override = os.environ.get(variable)
    if override:
        path = Path(override)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return _sub(name)


def templates_dir() -> Path:
    """Built templates; ``MVM_TEMPLATES`` may point elsewhere so that several homes
    (e.g. test runs) share one cache of read-only template trees."""
    return _shareable("MVM_TEMPLATES", "templates")


def snapshots_dir() -> Path:
    return _sub("snapshots", private=True)


def cache_dir() -> Path:
    """Kernels, initramfs, KVM probe verdicts, VM ready snapshots; ``MVM_CACHE`` may
    point elsewhere so several homes share them (all are derived, none is secret)."""
    return _shareable("MVM_CACHE", "cache")


def receipts_dir(*, create: bool = True) -> Path:
    """Signed ``commands.run`` receipts; like audit logs they outlive the sandbox (until
    ``mvmctl receipt prune``). ``create=False``: the path only, made or not."""
    return _sub("receipts", private=True) if create else mvm_home() / "receipts"


def runs_dir() -> Path:
    """Per-run transcripts of ``mvmctl run --mode live`` (sandbox logs, redacted)."""
    return _sub("runs", private=True)


def keys_dir() -> Path:
    return _sub("keys", private=True)


def secrets_dir() -> Path:
    return _sub("secrets", private=True)
