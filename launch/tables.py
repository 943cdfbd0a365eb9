"""The paper's analysis tables from trained runs, this machine's figures beside the paper's.

A thin shim for a checkout: `python launch/tables.py ARGS` is `hmaml tables ARGS`
(hmaml/commands/tables.py).
"""

import sys

from hmaml.commands.tables import main

if __name__ == "__main__":
    sys.exit(main())
