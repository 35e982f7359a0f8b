"""The supervisor's op table is the list of what it serves: docs/protocol.md documents
exactly its ops, and a running supervisor refuses any other op naming them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mvm
from mvm import errors
from mvm.supervisor.ops import OPS, Audit

PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _documented_supervisor_ops() -> dict[str, str]:
    """Every op named in the first column of the "Supervisor operations" table -> its row."""
    text = PROTOCOL_DOC.read_text()
    section = text.split("## Supervisor operations", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    ops: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_column = line.split("|")[1]
        for name in re.findall(r"`([a-z_.]+)`", first_column):
            ops[name] = line
    return ops


def test_every_op_in_the_table_is_documented_and_nothing_else() -> None:
    documented = _documented_supervisor_ops()
    assert sorted(documented) == sorted(OPS)


def test_the_docs_say_which_ops_are_forwarded_to_the_agent() -> None:
    documented = _documented_supervisor_ops()
    for name, op in OPS.items():
        assert ("forwarded to the agent" in documented[name]) == op.forwarded, name


def test_only_forwarded_ops_are_audited_by_the_dispatcher_and_transfers_have_an_opening_op() -> None:
    for op in OPS.values():
        if op.audit is Audit.PER_CALL:
            assert op.forwarded, op.name  # a local handler audits itself (BY_HANDLER)
        if op.audit is Audit.PER_TRANSFER:
            assert OPS["fs.write_begin"].audit is Audit.PER_CALL
        if op.auto_resume:
            assert op.states == ("running",), op.name


def test_an_unknown_op_is_refused_naming_the_tables_ops() -> None:
    with mvm.Sandbox.create("python-3.13", backend="namespace", ttl="5m") as sb:
        client = sb._client()
        with pytest.raises(errors.UnknownOp) as err:
            client.call("fs.sync")  # an agent op the supervisor does not serve to clients
        assert err.value.details["allowed"] == sorted(OPS)
        # and the sandbox goes on serving
        assert client.call("ping")[0] == {"state": "running"}
