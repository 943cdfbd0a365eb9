"""Pre-train an encoder as an ordinary classifier of the base classes, for ``model.init_from``.

A thin shim for a checkout: `python launch/pretrain.py ARGS` is `hmaml pretrain ARGS`
(hmaml/commands/pretrain.py).
"""

import sys

from hmaml.commands.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
