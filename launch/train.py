"""Train, validate and test one experiment: `accelerate launch launch/train.py --config cub5`.

A thin shim for a checkout: `python launch/train.py ARGS` is `hmaml train ARGS`
(hmaml/commands/train.py).
"""

import sys

from hmaml.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
