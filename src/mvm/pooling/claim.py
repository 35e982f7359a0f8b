"""The creator's side of a warm pool: find a member whose pool serves this create, take
it (atomically, ``store.take``) and claim it (``sandbox.claim``, which applies the
create's name, TTL, env, secrets, metadata and on_behalf_of). No pool that serves it,
or no member left: the caller starts a sandbox the usual way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import errors
from ..paths import sandboxes_dir
from ..spec import SandboxConfig
from ..supervisor.client import SupervisorClient
from ..supervisor.state import CONTROL_SOCKET
from . import store
from .ending import destroy_over
from .member import claim_args

#: How many taken members may fail their claim (died, expired, closed meanwhile) before
#: the create gives up on pools and starts a sandbox itself.
_MAX_ATTEMPTS = 4


def claim_member(
    config_for: Callable[[str], SandboxConfig],
    secret_env: dict[str, str],
    template_digest: str,
    on_behalf_of: dict[str, str] | None,
) -> tuple[SandboxConfig, dict[str, Any], SupervisorClient] | None:
    """A claimed member as ``(its config, its description, an open connection to it)``,
    or None. ``config_for(sandbox_id)`` is the config the create asks for, with the id
    of the member it would get (a default name is derived from the id)."""
    probe = config_for("sb-0000000000")
    attempts = 0
    for directory, record in store.live_pools():
        try:
            serves = store.PoolSpec.from_json(record["serves"]).serves(probe, template_digest)
        except (KeyError, TypeError, ValueError, errors.MvmError):
            continue
        if not serves:
            continue
        for member in store.takeable(directory):
            if not store.take(str(record["id"]), member):
                continue  # another creator took it first
            attempts += 1
            claimed = _claim(member, config_for(member), secret_env, on_behalf_of)
            if claimed is not None:
                return claimed
            if attempts >= _MAX_ATTEMPTS:
                return None
    return None


def _claim(
    member: str, config: SandboxConfig, secret_env: dict[str, str], on_behalf_of: dict[str, str] | None
) -> tuple[SandboxConfig, dict[str, Any], SupervisorClient] | None:
    try:
        client = SupervisorClient(sandboxes_dir() / member / CONTROL_SOCKET, on_behalf_of=on_behalf_of)
    except errors.MvmError:
        return None  # it died or expired after being listed
    try:
        state, _ = client.call("sandbox.claim", claim_args(config, secret_env))
    except errors.InvalidState:
        client.close()  # not waiting any more (expired, its pool closed): never someone else's to end
        return None
    except errors.InvalidArgument:
        destroy_over(client)  # taken, so nobody else will: it must not wait for its TTL
        raise
    except errors.MvmError:
        destroy_over(client)
        return None
    except BaseException:
        destroy_over(client)
        raise
    return config, state, client

