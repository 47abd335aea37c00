"""``python -m harness.sweep``: the command line of ``harness.sweep.cli``."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
