"""Scale-out across hosts through Ray (the ``mvm[ray]`` extra); docs/scale-out.md.

``agent.py``     the node agent (one detached Ray actor per node; relays requests to the
                 node's supervisors, reports capacity, moves snapshots node to node)
``placement.py`` node reports -> ordered candidates (locality, spread, pack)
``client.py``    ``connect_cluster`` / ``Cluster`` / ``ClusterTransport`` (the same
                 ``mvm.Sandbox`` over a relay to the owning node)
``nodes.py``     the Ray actor class
"""

from __future__ import annotations

from .agent import NodeLimits
from .client import Cluster, ClusterTransport, connect_cluster
from .placement import DEFAULT_STRATEGY, STRATEGIES

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "Cluster", "ClusterTransport", "NodeLimits", "connect_cluster"]
