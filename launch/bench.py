"""Benchmarks that print figures; each prints one JSON object as the last line of stdout.

A thin shim for a checkout: `python launch/bench.py ARGS` is `hmaml bench ARGS`
(hmaml/commands/bench.py).
"""

import sys

from hmaml.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
