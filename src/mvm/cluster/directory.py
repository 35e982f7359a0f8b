"""The cluster's memory of which sandbox lives on which node, in Ray's GCS key-value
store (namespace ``mvm``, keys ``sandbox/<id>``). It outlives any node, which is what
lets ``Cluster.list()`` in any process report a dead node's sandboxes as ``lost``, and
lets a fresh process route an id with one lookup.

It is a cache of the nodes' own records: a node agent writes an entry when it creates
a sandbox and deletes it when a relayed ``sandbox.destroy`` succeeds; ``Cluster.list()``
drops entries an alive node no longer has (TTL expiry, destroyed elsewhere). Losing the
whole store loses only the ``lost`` bookkeeping — alive nodes still report everything.
"""

from __future__ import annotations

import json
from typing import Any

NAMESPACE = "mvm"
PREFIX = "sandbox/"
#: What an entry keeps of a sandbox's record (enough for ``SandboxInfo`` and routing).
FIELDS = ("id", "name", "node_id", "template", "backend", "resources", "network", "created_at", "expires_at",
          "workload_id", "tags", "run_id")


def remember(record: dict[str, Any]) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    entry = {key: record.get(key) for key in FIELDS}
    _internal_kv_put(PREFIX + str(record["id"]), json.dumps(entry), overwrite=True, namespace=NAMESPACE)


def forget(sandbox_id: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(PREFIX + sandbox_id, namespace=NAMESPACE)


def lookup(sandbox_id: str) -> dict[str, Any] | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(PREFIX + sandbox_id, namespace=NAMESPACE)
    return dict(json.loads(raw)) if raw else None


def entries() -> list[dict[str, Any]]:
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    out = []
    for key in _internal_kv_list(PREFIX, namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw:
            out.append(dict(json.loads(raw)))
    return out
