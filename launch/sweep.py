"""Run a sweep of trials, show where it stands, or rebuild its summary.

A thin shim for a checkout: `python launch/sweep.py ARGS` is `hmaml sweep ARGS`
(hmaml/commands/sweep.py).
"""

import sys

from hmaml.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
