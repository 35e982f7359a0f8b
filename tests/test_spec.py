"""mvm.spec: the one typed definition of a sandbox's config, shared by SDK, CLI,
supervisor and modes. Pure functions: no sandbox is made here."""

from __future__ import annotations

import json
from typing import Any

import pytest

import mvm
from mvm import errors
from mvm.protocol import requests
from mvm.durations import parse_duration
from mvm.spec import LIMITS, NetworkPolicy, Resources, SandboxConfig


def _config(**overrides: Any) -> dict[str, Any]:
    base = SandboxConfig(
        id="sb-0123456789", name="web-1", template="python-3.13", backend="namespace",
        resources=mvm.resources(cpu_cores=2, memory_mb=1024),
        network=mvm.network(mode="allow", allow=["pypi.org:443"]),
        ttl_seconds=1800, env={"MODE": "dev"}, secret_env_names={"API_KEY": "api-key"},
        workload_id="wl", tags={"team": "a"}, created_at=1700000000.5, from_snapshot=None, run_id="run-1",
        template_dir="/var/tmp/mvm-templates/python-3.13-0123456789abcdef", isolation="namespace",
    ).to_json()
    base.update(overrides)
    return base


def test_config_round_trips_through_json_unchanged() -> None:
    data = _config()
    again = SandboxConfig.from_json(json.loads(json.dumps(data)))
    assert again.to_json() == data
    assert again.resources == Resources(cpu_cores=2.0, memory_mb=1024, rootfs_size_mb=1024, max_processes=256)
    assert again.network == NetworkPolicy(mode="allow", allow=("pypi.org:443",), allow_wildcards=False)
    assert "secret" not in json.dumps(data).replace("secret_env_names", "")  # names only, never values


@pytest.mark.parametrize(("override", "field", "error"), [
    ({"resources": {"memory_mb": 10}}, "resources.memory_mb", errors.InvalidArgument),
    ({"resources": {"gpus": 1}}, "resources.gpus", errors.InvalidArgument),
    ({"network": {"mode": "wide"}}, "network.mode", errors.InvalidNetworkPolicy),
    ({"network": {"mode": "allow", "allow": ["127.0.0.1:80"]}}, "network.allow['127.0.0.1:80']",
     errors.InvalidNetworkPolicy),
    ({"name": "Not A Name"}, "name", errors.InvalidArgument),
    ({"env": {"A=B": "x"}}, "env", errors.InvalidArgument),
    ({"tags": {"k": 1}}, "tags", errors.InvalidArgument),
    ({"ttl_seconds": -5}, "ttl", errors.InvalidArgument),
    ({"backend": ""}, "backend", errors.InvalidArgument),
    ({"template_dir": "templates/python-3.13"}, "template_dir", errors.InvalidArgument),
    ({"isolation": ""}, "isolation", errors.InvalidArgument),
])
def test_from_json_refuses_bad_input_naming_the_field(override: dict[str, Any], field: str,
                                                      error: type[errors.MvmError]) -> None:
    with pytest.raises(error) as caught:
        SandboxConfig.from_json(_config(**override))
    assert caught.value.field == field


def test_the_sdk_builders_are_the_spec_checks() -> None:
    for name, (low, high) in LIMITS.items():
        with pytest.raises(errors.InvalidArgument, match=f"resources.{name}"):
            mvm.resources(**{name: high * 2})
        assert Resources.from_json({name: low}) == mvm.resources(**{name: low})
    assert mvm.network() == NetworkPolicy.from_json({}) == NetworkPolicy()


def test_run_limits_default_and_bounds() -> None:
    assert requests.check_run_limits({}) == (requests.DEFAULT_MAX_OUTPUT_BYTES, None)
    for bad in (0, -1, requests.MAX_OUTPUT_LIMIT + 1, True, 1.5):
        with pytest.raises(errors.InvalidArgument, match="max_output_bytes"):
            requests.check_run_limits({"max_output_bytes": bad})
    for bad in (0, -1, float("inf"), "5"):
        with pytest.raises(errors.InvalidArgument, match="timeout_seconds"):
            requests.check_run_limits({"timeout_seconds": bad})


def test_messages_show_values_in_words_both_sdks_use() -> None:
    """``shown``/``kind_of`` (one rule, mirrored by the TypeScript SDK's ``shown``/``kindOf``):
    no Python spelling (None, True, NoneType, dict) reaches a message."""
    from mvm.errors import kind_of, shown

    assert [shown(v) for v in (None, True, False, 3, 2.5, "it's", [None, "a"], {"k": False})] == [
        "null", "true", "false", "3", "2.5", '"it\'s"', "[null, 'a']", "{'k': false}"]
    assert [kind_of(v) for v in (None, True, 1, 1.5, "s", b"b", [1], (1,), {"a": 1})] == [
        "null", "boolean", "number", "number", "string", "bytes", "list", "list", "object"]
    with pytest.raises(errors.InvalidArgument) as caught:
        mvm.resources(max_processes=True)  # type: ignore[arg-type]
    assert str(caught.value) == "resources.max_processes: true is not a number (allowed: 8..65536)"
    with pytest.raises(errors.InvalidArgument) as caught:
        parse_duration(None, field="ttl")
    assert str(caught.value).startswith("ttl: null is not a duration")
