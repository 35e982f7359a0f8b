"""mvm's security libraries (DESIGN §3); see ``docs/security.md`` for formats and layout.

* :mod:`.secrets`   — ``SecretRef``, the encrypted ``Keystore``, ``resolve_secret``,
  ``secret_available``, ``Redactor`` / ``redact_stream``.
* :mod:`.audit`     — ``AuditLog`` (hash-chained, Ed25519-signed JSON lines), ``verify``,
  ``tail``, ``follow``, ``find``.
* :mod:`.receipts`  — ``write_receipt`` / ``verify_receipt``.
* :mod:`.keys`      — host keys under ``$MVM_HOME/keys`` (created on first use, 0600).
* :mod:`.canonical` — ``canonical_json`` (RFC 8785), used for everything hashed or signed.

Snapshot sealing (keys and canonical JSON from here) is the :mod:`mvm.snapshots` package.

Nothing is imported here, so ``import mvm.security.secrets`` stays cheap.
"""
