"""Train, validate and test one experiment: `accelerate launch launch/train.py --config cub5`.

Overrides follow the config: `... --config quickstart train.epochs=5 method.hn_width=256`.
Re-running the same command on the same run directory resumes it; SIGTERM checkpoints and exits 0.
"""

from __future__ import annotations

import argparse
import sys

from hmaml.config import load_config
from hmaml.errors import one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="a config name in configs/ (e.g. cub5) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from hmaml.train.loop import train

    result = train(cfg)
    if result["status"] == "preempted":
        print(f"stopped at epoch {result['epoch']}; checkpoint in {result['run_dir']} "
              "(re-run the same command to resume)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
