"""Entry point for ``python -m experiments``."""

import sys

from experiments import cli

if __name__ == "__main__":
    sys.exit(cli.main())
