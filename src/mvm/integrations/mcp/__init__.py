"""mvm as a Model Context Protocol server: ``mvmctl mcp`` (``pip install 'mvm[mcp]'``)."""
