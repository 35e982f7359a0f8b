"""Plan-mode admission: would this host run these workloads, and if not, why not.

Checks, for each workload IR (DESIGN §2, plan mode):

* **template** — the name can be built here (``mvm.templates.available_templates()``;
  a custom TOML template must parse);
* **resources** — within the SDK's bounds and the host policy (cpus, memory, disk,
  processes);
* **network** — a valid policy, of a mode the host policy allows;
* **ttl** — set, and no longer than the host's maximum;
* **secrets** — every ``secret_ref`` resolvable (keystore or ``MVM_SECRET_<NAME>``),
  checked by name: no value is read into the plan;
* **backend** — a known backend name when one is requested (availability is not
  probed: probing may boot a guest, and plan mode boots nothing).

The host policy defaults to: ``max_cpus`` = this host's cores, ``max_memory_mb`` = 75 %
of its RAM, ``max_disk_mb`` = the size of the filesystem holding ``$MVM_HOME``,
``max_ttl`` = 24 h, ``max_processes`` = the SDK's bound, every network mode.
``$MVM_HOME/policy.toml`` overrides any of them::

    max_cpus = 4
    max_memory_mb = 8192
    max_disk_mb = 20480
    max_ttl = "8h"              # or seconds; "none" admits sandboxes without a TTL
    max_processes = 1024
    network_modes = ["deny", "allow"]

Everything in a report is deterministic for a given host, policy and input (no
timestamps, no free-space figures), so a compiled ``plan.json`` is reproducible.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import errors
from ..durations import format_duration, parse_duration
from ..security.secrets import env_var_for, secret_available
from ..spec import LIMITS, NETWORK_MODES, NetworkPolicy, Resources

PLAN_VERSION = "plan-v1"
POLICY_FILE = "policy.toml"
DEFAULT_MAX_TTL_SECONDS = 24 * 3600
_POLICY_KEYS = ("max_cpus", "max_memory_mb", "max_disk_mb", "max_ttl", "max_processes", "network_modes")
_MIB = 1024 * 1024


@dataclass(frozen=True)
class HostPolicy:
    max_cpus: float
    max_memory_mb: int
    max_disk_mb: int
    max_ttl_seconds: int | None  # None: sandboxes without a TTL are admitted
    max_processes: int
    network_modes: tuple[str, ...]
    source: str  # "defaults" or the policy file's path

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["network_modes"] = list(self.network_modes)
        return data


def _home() -> Path:
    # Not paths.mvm_home(): plan mode must not create state.
    return Path(os.environ.get("MVM_HOME") or Path.home() / ".mvm")


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_memory_mb() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // _MIB


def host_disk_mb() -> int:
    path = _home()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).total // _MIB


def default_policy() -> HostPolicy:
    return HostPolicy(max_cpus=float(host_cpus()), max_memory_mb=host_memory_mb() * 3 // 4,
                      max_disk_mb=host_disk_mb(), max_ttl_seconds=DEFAULT_MAX_TTL_SECONDS,
                      max_processes=LIMITS["max_processes"][1], network_modes=NETWORK_MODES, source="defaults")


def load_policy(path: Path | str | None = None) -> HostPolicy:
    """The host policy: defaults, overridden by ``$MVM_HOME/policy.toml`` (or ``path``)."""
    policy_path = Path(path) if path is not None else _home() / POLICY_FILE
    base = default_policy()
    if not policy_path.is_file():
        if path is not None:
            raise errors.InvalidArgument("policy", f"{policy_path} does not exist")
        return base
    try:
        raw = tomllib.loads(policy_path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise errors.InvalidArgument(str(policy_path), f"is not valid TOML: {exc}") from None
    values = asdict(base)
    for key, value in raw.items():
        field = f"{policy_path.name}: {key}"
        if key not in _POLICY_KEYS:
            raise errors.InvalidArgument(field, "unknown setting", allowed=list(_POLICY_KEYS))
        if key == "max_ttl":
            values["max_ttl_seconds"] = None if value in ("none", 0) else parse_duration(value, field=field)
        elif key == "network_modes":
            if not isinstance(value, list) or not all(m in NETWORK_MODES for m in value):
                raise errors.InvalidArgument(field, f"{value!r} is not a list of network modes",
                                             allowed=list(NETWORK_MODES))
            values["network_modes"] = tuple(value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
                    or (key != "max_cpus" and not float(value).is_integer()):
                raise errors.InvalidArgument(field, f"{value!r} must be a positive "
                                             + ("number" if key == "max_cpus" else "whole number"))
            values[key] = float(value) if key == "max_cpus" else int(value)
    values["source"] = str(policy_path)
    return HostPolicy(**values)


# ---- checks --------------------------------------------------------------------------------


def _check(check: str, ok: bool, field: str, message: str) -> dict[str, Any]:
    return {"check": check, "ok": ok, "field": field, "message": message}


def secret_names(doc: dict[str, Any]) -> list[str]:
    """Every secret a workload references (create env and command envs), sorted."""
    names = {v["name"] for v in doc["env"].values() if v["kind"] == "secret_ref"}
    for op in doc["operations"]:
        names.update(v["name"] for v in op.get("env", {}).values() if v["kind"] == "secret_ref")
    return sorted(names)


def check_workload(doc: dict[str, Any], policy: HostPolicy) -> list[dict[str, Any]]:
    """Every admission check on one workload IR, passed or not, in a fixed order."""
    from ..backends import backend_names
    from ..templates import available_templates, check_template

    checks = []
    template = doc["template"]
    if template in available_templates():
        checks.append(_check("template", True, "template", f"{template} can be built here"))
    else:
        try:
            check_template(template)  # a custom TOML file parses, an oci: reference is well-formed; never builds
            checks.append(_check("template", True, "template", f"{template} (custom or OCI image) can be built here"))
        except errors.MvmError as exc:
            checks.append(_check("template", False, "template", str(exc)))

    res = doc["resources"]
    try:
        Resources.validated(**res)
        bounds_ok = True
    except errors.InvalidArgument as exc:
        checks.append(_check("resources", False, exc.field, str(exc)))
        bounds_ok = False
    if bounds_ok:
        for field, limit, unit, name in (
                ("cpu_cores", policy.max_cpus, "", "max_cpus"),
                ("memory_mb", policy.max_memory_mb, " MiB", "max_memory_mb"),
                ("rootfs_size_mb", policy.max_disk_mb, " MiB", "max_disk_mb"),
                ("max_processes", policy.max_processes, "", "max_processes")):
            value = res[field]
            ok = value <= limit
            shown = f"{_num(value)}{unit}"
            checks.append(_check("resources", ok, f"resources.{field}",
                                 f"{shown} <= host {name} {_num(limit)}{unit}" if ok else
                                 f"{shown} exceeds the host policy's {name} of {_num(limit)}{unit} ({policy.source})"))

    net = doc["network"]
    try:
        NetworkPolicy.validated(net["mode"], list(net["allow"]), allow_wildcards=net["allow_wildcards"])
        if net["mode"] in policy.network_modes:
            checks.append(_check("network", True, "network.mode", _describe_network(net)))
        else:
            checks.append(_check("network", False, "network.mode",
                                 f"mode {net['mode']!r} is not allowed by the host policy ({policy.source})"
                                 f"; allowed: {', '.join(policy.network_modes)}"))
    except errors.InvalidArgument as exc:
        checks.append(_check("network", False, exc.field, str(exc)))

    ttl = doc["ttl_seconds"]
    if policy.max_ttl_seconds is None:
        checks.append(_check("ttl", True, "ttl", "no maximum TTL in the host policy"))
    elif ttl is None:
        checks.append(_check("ttl", False, "ttl", "no expiry (ttl=None) but the host policy's max_ttl is "
                             f"{format_duration(policy.max_ttl_seconds)} ({policy.source})"))
    elif ttl > policy.max_ttl_seconds:
        checks.append(_check("ttl", False, "ttl", f"{format_duration(ttl)} exceeds the host policy's max_ttl of "
                             f"{format_duration(policy.max_ttl_seconds)} ({policy.source})"))
    else:
        checks.append(_check("ttl", True, "ttl", f"{format_duration(ttl)} <= host max_ttl "
                             f"{format_duration(policy.max_ttl_seconds)}"))

    for name in secret_names(doc):
        if secret_available(name):
            checks.append(_check("secret", True, f"secret[{name!r}]", f"secret {name!r} is set on this host"))
        else:
            checks.append(_check("secret", False, f"secret[{name!r}]",
                                 f"secret {name!r} is not set: set it with `mvmctl secret set {name}` "
                                 f"or export {env_var_for(name)}"))

    backend = doc["backend"] or os.environ.get("MVM_BACKEND") or None
    if backend is not None:
        ok = backend in backend_names()
        checks.append(_check("backend", ok, "backend", f"backend {backend!r} requested" if ok else
                             f"unknown backend {backend!r} (allowed: {', '.join(backend_names())})"))
    return checks


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _describe_network(net: dict[str, Any]) -> str:
    if net["mode"] == "deny":
        return "deny: no network interface but loopback"
    if net["mode"] == "open":
        return "open: full outbound access"
    return "allow: egress only to " + ", ".join(net["allow"])


# ---- the plan --------------------------------------------------------------------------------


def summarize_operation(op: dict[str, Any]) -> str:
    """One readable line for an IR operation."""
    kind: str = op["op"]
    if kind == "files.write":
        return f"write {op['path']} ({op['size']} bytes, mode {op['mode']:o}, sha256 {op['sha256'][:12]})"
    if kind in ("commands.run", "commands.start"):
        verb = "run" if kind == "commands.run" else f"start process #{op['process'] + 1}:"
        text = f"{verb} {_argv(op['argv'])}"
        if op["env"]:
            text += "  env " + ", ".join(_env_item(k, v) for k, v in sorted(op["env"].items()))
        if op["cwd"]:
            text += f"  cwd {op['cwd']}"
        if kind == "commands.run":
            text += f"  timeout {_num(op['timeout_seconds'])}s" if op["timeout_seconds"] else "  no timeout"
            if op["stdin_sha256"]:
                text += "  with stdin"
        return text
    if kind == "files.mkdir":
        return f"mkdir {op['path']}"
    if kind == "files.remove":
        return f"remove {op['path']}" + (" (recursive)" if op["recursive"] else "")
    if kind == "files.move":
        return f"move {op['src']} -> {op['dst']}"
    if kind == "process.signal":
        return f"signal process #{op['process'] + 1} with {op['signal']}"
    if kind == "process.stdin":
        return f"send {op['size']} bytes to process #{op['process'] + 1}'s stdin"
    if kind == "process.close_stdin":
        return f"close process #{op['process'] + 1}'s stdin"
    if kind == "sandbox.snapshot":
        return f"snapshot #{op['snapshot'] + 1}" + (f" {op['name']!r}" if op["name"] else "")
    if kind == "sandbox.resume":
        snap = op["snapshot"]
        if snap is None:
            return "resume"
        return "resume from " + (f"snapshot #{snap['recorded'] + 1}" if "recorded" in snap else repr(snap["id"]))
    return kind.removeprefix("sandbox.")


def _argv(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def _env_item(key: str, value: dict[str, str]) -> str:
    if value["kind"] == "secret_ref":
        return f"{key}=secret:{value['name']}"
    return f"{key}={value['value']}"


def plan_workload(doc: dict[str, Any], sha256: str, policy: HostPolicy, *,
                  sites: tuple[str | None, list[str | None]] | None = None) -> dict[str, Any]:
    checks = check_workload(doc, policy)
    ops = []
    op_sites = sites[1] if sites else [None] * len(doc["operations"])
    for op, at in zip(doc["operations"], op_sites, strict=True):
        entry = {"op": op["op"], "summary": summarize_operation(op)}
        if at:
            entry["at"] = at
        ops.append(entry)
    files = doc["include"]["files"]
    plan = {
        "workload_sha256": sha256,
        "workload_id": doc["workload_id"],
        "name": doc["name"],
        "template": doc["template"],
        "backend": doc["backend"] or os.environ.get("MVM_BACKEND") or "auto",
        "resources": doc["resources"],
        "network": doc["network"],
        "ttl_seconds": doc["ttl_seconds"],
        "tags": doc["tags"],
        "from_snapshot": doc["from_snapshot"],
        "auto_pause_seconds": doc.get("auto_pause_seconds"),
        "on_behalf_of": doc.get("on_behalf_of"),
        "env": doc["env"],
        "include": {"guest_root": doc["include"]["guest_root"], "files": len(files),
                    "bytes": sum(f["size"] for f in files), "tree_sha256": doc["include"]["tree_sha256"]},
        "operations": ops,
        "left_running": not any(op["op"] == "sandbox.destroy" for op in doc["operations"]),
        "checks": checks,
        "admitted": all(c["ok"] for c in checks),
    }
    if sites and sites[0]:
        plan["at"] = sites[0]
    return plan


def make_plan(workloads: Sequence[tuple[dict[str, Any], tuple[str | None, list[str | None]] | None]], *,
              policy: HostPolicy | None = None) -> dict[str, Any]:
    """The plan report for workload IRs (``(doc, sites)`` pairs, sites optional): each
    workload's plan and checks, every failed check as a reason, and ``admitted``."""
    from .ir import ir_hash

    policy = policy or load_policy()
    plans = [plan_workload(doc, ir_hash(doc), policy, sites=sites) for doc, sites in workloads]
    reasons = []
    for i, plan in enumerate(plans):
        for check in plan["checks"]:
            if not check["ok"]:
                reasons.append({"workload": i, "check": check["check"], "field": check["field"],
                                "message": check["message"]})
    return {"version": PLAN_VERSION, "admitted": not reasons, "host_policy": policy.to_dict(),
            "workloads": plans, "reasons": reasons}


def render_plan(report: dict[str, Any]) -> str:
    """The plan for a terminal: what would boot, with what limits, which commands and files, in order."""
    lines = []
    count = len(report["workloads"])
    verdict = "ADMITTED" if report["admitted"] else "NOT ADMITTED"
    lines.append(f"plan: {verdict} on this host — {count} sandbox{'es' if count != 1 else ''} would boot"
                 if count else "plan: the script creates no sandbox; nothing would boot")
    for i, w in enumerate(report["workloads"]):
        res = w["resources"]
        title = w["workload_id"] or w["name"] or f"sandbox {i + 1}"
        lines.append("")
        lines.append(f"sandbox {i + 1}: {title}" + (f"  (created at {w['at']})" if w.get("at") else ""))
        lines.append(f"  template   {w['template']}   backend {w['backend']}"
                     + (f"   name {w['name']}" if w["name"] else ""))
        lines.append(f"  limits     {_num(res['cpu_cores'])} cpu, {res['memory_mb']} MiB memory, "
                     f"{res['rootfs_size_mb']} MiB disk, {res['max_processes']} processes")
        ttl = w["ttl_seconds"]
        lines.append(f"  ttl        {format_duration(ttl) if ttl else 'none (no expiry)'}")
        lines.append(f"  network    {_describe_network(w['network'])}")
        if w["env"]:
            lines.append("  env        " + ", ".join(_env_item(k, v) for k, v in sorted(w["env"].items())))
        inc = w["include"]
        if inc["files"]:
            lines.append(f"  include    {inc['files']} file{'s' if inc['files'] != 1 else ''}, {inc['bytes']} bytes "
                         f"-> {inc['guest_root']}  (tree sha256 {inc['tree_sha256'][:16]})")
        if w["from_snapshot"]:
            lines.append(f"  from       snapshot {w['from_snapshot']}")
        if w.get("auto_pause_seconds"):
            lines.append(f"  auto-pause after {format_duration(w['auto_pause_seconds'])} idle")
        if w.get("on_behalf_of"):
            lines.append("  acts for   " + ", ".join(f"{k}={v}" for k, v in sorted(w["on_behalf_of"].items())))
        lines.append("  operations")
        if not w["operations"]:
            lines.append("    (none)")
        for n, op in enumerate(w["operations"], 1):
            lines.append(f"    {n:>2}. {op['summary']}" + (f"   [{op['at']}]" if op.get("at") else ""))
        if w["left_running"]:
            lines.append(f"    (the script leaves it running{' until its TTL' if ttl else ''})")
        lines.append("  checks")
        for c in w["checks"]:
            lines.append(f"    {'ok ' if c['ok'] else 'NO '} {c['check']:<9} {c['message']}")
        lines.append(f"  workload sha256 {w['workload_sha256']}")
    if report["reasons"]:
        lines.append("")
        lines.append("not admitted:")
        for r in report["reasons"]:
            lines.append(f"  - sandbox {r['workload'] + 1}: {r['field']}: {r['message']}")
    return "\n".join(lines)
