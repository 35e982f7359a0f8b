"""``python -m mvm.cli`` == ``mvmctl``."""

from .main import main

main()
