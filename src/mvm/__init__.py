"""mvm: disposable, policy-bound sandboxes for untrusted code."""
