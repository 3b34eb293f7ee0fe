"""Entry point for ``python -m experiments``."""

import gc
import os
import signal
import sys

from experiments import cli

if __name__ == "__main__":
    try:
        status = cli.main()
    except KeyboardInterrupt:  # a second Ctrl-C, while main wrote the first's line
        status = cli.INTERRUPTED
    # The command is done, its results written and reported: a Ctrl-C from here on is ignored. It
    # printed "Exception ignored in ..." with a traceback (in jax's atexit clean-up, about 0.7 s,
    # or in its gc callback during the collection below), or killed the process (exit -2).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
