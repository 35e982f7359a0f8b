"""Warm pools: pre-started sandboxes a create claims instead of starting one.

``store.py`` is the pool on disk (what it serves, its claimable members, the atomic
take), ``member.py`` a member's side in its supervisor (state ``pooled``, the
``sandbox.claim`` op, leaving), ``claim.py`` the creator's side (find a member whose
pool serves the create, take it, claim it), ``ending.py`` whether a member still runs
(its supervisor's pid and start time) and destroying one from outside. The owner's
handle (``mvm.pool``, refill) is ``mvm/sdk/pool.py``.

Import the module you need (``from mvm.pooling import store``): this package loads
none of them, so reading a pool's limits does not load a supervisor's side.
"""
