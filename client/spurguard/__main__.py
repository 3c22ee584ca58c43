"""`python -m spurguard`: the `spurguard` command line (a module of the PEP 420 namespace package)."""
import sys

from spurguard.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
