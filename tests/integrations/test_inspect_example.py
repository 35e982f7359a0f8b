"""``examples/inspect_task.py`` through the real ``inspect eval`` CLI, offline, to a score."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("inspect_ai", reason="the inspect extra is not installed (pip install -e '.[test]')")

from inspect_ai.log import list_eval_logs, read_eval_log

import mvm

REPO = Path(__file__).resolve().parents[2]
INSPECT = str(Path(sys.executable).with_name("inspect"))


def test_inspect_eval_runs_the_example_to_a_perfect_score(tmp_path: Path) -> None:
    """On the namespace backend (the adapter's VM path is covered by the self-check)."""
    backend = "namespace"
    before = {info.id for info in mvm.Sandbox.list()}
    proc = subprocess.run(
        [INSPECT, "eval", "examples/inspect_task.py", "--sandbox", "mvm", "--model", "mockllm/model",
         "--log-dir", str(tmp_path), "--display", "plain"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "MVM_BACKEND": backend},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [log_info] = list_eval_logs(str(tmp_path))
    log = read_eval_log(log_info)
    assert log.status == "success"
    assert log.eval.sandbox is not None and log.eval.sandbox.type == "mvm"
    assert log.results is not None
    [score] = log.results.scores
    assert score.metrics["accuracy"].value == 1.0
    assert log.samples is not None and sorted(s.scores["answer_file_matches"].answer for s in log.samples) == [
        "1024", "42",
    ]
    assert {info.id for info in mvm.Sandbox.list()} <= before  # every sample's sandbox is gone
