"""Test a run's best checkpoint with the test protocol (the hypernetwork alone for HyperMAML).

A thin shim for a checkout: `python launch/evaluate.py ARGS` is `hmaml evaluate ARGS`
(hmaml/commands/evaluate.py).
"""

import sys

from hmaml.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
