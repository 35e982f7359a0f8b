"""Record, plan and live: one workload script, three ways to run it (DESIGN §2).

* :mod:`mvm.modes.recording` — ``RecordTransport``: in record/plan mode
  ``mvm.Sandbox`` / ``mvm.AsyncSandbox`` send their wire requests to it instead of a
  supervisor; it appends them to a process-wide recording; nothing boots.
* :mod:`mvm.modes.ir` — the workload IR (``workload-v1``): built from a recording,
  validated against ``schema/workload-v1.json``, canonical JSON (RFC 8785), sha256 id.
* :mod:`mvm.modes.admission` — plan-mode admission against the host policy.
* :mod:`mvm.modes.runner` — running a script in a mode (``mvmctl compile`` / ``run``),
  and ``replay`` for ``mvmctl up --from-ir``.
"""

#: Seconds a script may run in record/plan mode (``mvmctl compile|run --timeout``). Here, not in
#: ``runner``, so ``mvmctl`` can show it in its options without loading the modes' code.
DEFAULT_RECORD_TIMEOUT = 60.0
