"""Pack a few-shot dataset into WebDataset shards, verify a pack, or download raw archives.

A thin shim for a checkout: `python launch/pack.py ARGS` is `hmaml pack ARGS`
(hmaml/commands/pack.py).
"""

import sys

from hmaml.commands.pack import main

if __name__ == "__main__":
    sys.exit(main())
