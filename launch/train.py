"""Train, validate and test one experiment: `accelerate launch launch/train.py --config cub5`.

Overrides follow the config: `... --config quickstart train.epochs=5 method.hn_width=256`.
Re-running the same command on the same run directory resumes it; SIGTERM checkpoints and exits 0.
`--dry-run` prints the resolved config and the distributed plan (processes, tasks per rank per
step, micro-batches, steps per epoch, precision, engine) and exits without training; with
`--accelerate-config FILE` it plans for that launch file, else for the current launch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from hmaml.config import load_config
from hmaml.errors import one_line_errors
from hmaml.train.plan import dry_run, is_rank0, launch_from_env, launch_from_file
from hmaml.train.rundir import Status


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="a config name in configs/ (e.g. cub5) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the distributed plan, then exit")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="with --dry-run: plan for this accelerate config file")
    parser.add_argument("--processes", type=int, metavar="N",
                        help="with --dry-run: plan for N processes (overrides the launch's)")
    parser.add_argument("--nodes", type=int, metavar="N",
                        help="with --dry-run: spread the processes over N nodes")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        launch = (launch_from_file(args.accelerate_config) if args.accelerate_config
                  else launch_from_env())
        launch = replace(launch, processes=args.processes or launch.processes,
                         nodes=args.nodes or launch.nodes)
        if is_rank0():
            print(dry_run(cfg, launch))
        return 0
    from hmaml.train.loop import train

    result = train(cfg)
    if result.status == Status.PREEMPTED:
        print(f"stopped at epoch {result.epoch}; checkpoint in {result.run_dir} "
              "(re-run the same command to resume)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
