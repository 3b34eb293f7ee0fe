"""Entry point for ``python -m experiments``."""

import gc
import os
import sys

from experiments import cli

if __name__ == "__main__":
    status = cli.main()
    if status == cli.INTERRUPTED:
        # A Ctrl-C during an XLA compilation cuts it short while its compiler threads run on, and
        # the interpreter's finalization then crashed with SIGSEGV (about 1 in 12 such Ctrl-Cs,
        # after the interrupt's line was printed). Every result is stored and synced by now: the
        # process ends at once, without finalizing; what its objects' own finalizers do (e.g.
        # removing the semaphores of a pool of workers) is done first.
        gc.collect()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more to show
                pass
        os._exit(status)
    sys.exit(status)
