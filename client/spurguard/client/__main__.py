"""`python -m spurguard.client`: the `spurguard` command line."""
import sys

from spurguard.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
