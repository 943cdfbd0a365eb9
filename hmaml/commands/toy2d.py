"""The paper's 2-D toy: MAML-1 vs MAML-5 vs HyperMAML on four task types, drawn as a figure."""

from __future__ import annotations

import argparse

from hmaml.toy import run_toy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmaml toy2d", description=__doc__)
    parser.add_argument("--out", default="toy2d.png", help="where to write the figure (PNG)")
    parser.add_argument("--steps", type=int, default=1500, help="meta-training steps per method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_toy(args.out, args.steps, args.seed)
    return 0
