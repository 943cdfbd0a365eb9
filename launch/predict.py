"""Classify your own images with a trained run adapted to your own support set.

A thin shim for a checkout: `python launch/predict.py ARGS` is `hmaml predict ARGS`
(hmaml/commands/predict.py).
"""

import sys

from hmaml.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
