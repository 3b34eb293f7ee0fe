"""Entry point for ``python -m experiments``."""

import sys

from experiments import cli

sys.exit(cli.main())
