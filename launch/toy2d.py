"""The paper's 2-D toy: MAML-1 vs MAML-5 vs HyperMAML on four task types, drawn as a figure.

A thin shim for a checkout: `python launch/toy2d.py ARGS` is `hmaml toy2d ARGS`
(hmaml/commands/toy2d.py).
"""

import sys

from hmaml.commands.toy2d import main

if __name__ == "__main__":
    sys.exit(main())
