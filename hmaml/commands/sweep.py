"""Run a sweep of trials, show where it stands, or rebuild its summary.

    python launch/sweep.py --sweep configs/sweeps/ablation_omni_emnist1.yaml [--cluster slurm]
    python launch/sweep.py --sweep configs/sweeps/lr_width.yaml --dry-run
    python launch/sweep.py --sweep configs/sweeps/paper_omni_emnist.yaml executor.trials_per_gpu=3
    python launch/sweep.py --status runs/sweeps/ablation_omni_emnist1
    python launch/sweep.py --summarize runs/sweeps/ablation_omni_emnist1

Submitting a sweep again skips its finished trials and resumes the others.
"""

from __future__ import annotations

import argparse

from hmaml.errors import one_line_errors
from hmaml.sweep import CLUSTERS, status_table, submit, summarize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmaml sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sweep", metavar="FILE", help="a sweep file, or the name of a shipped one "
                      "(configs/sweeps/*.yaml: search_quickstart)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="with --sweep: changes to the sweep file, e.g. sweep_dir=DIR, "
                             "executor.trials_per_gpu=4, overrides.train.epochs=10 (a trial "
                             "override); a later submission must repeat them")
    what.add_argument("--status", metavar="SWEEP_DIR", help="print the state of every trial")
    what.add_argument("--summarize", metavar="SWEEP_DIR",
                      help="(re)build summary.md/.csv/.png and log them to the parent run")
    parser.add_argument("--cluster", choices=CLUSTERS,
                        help="where trials run (default: the sweep file's executor.cluster): "
                             "slurm = one job array, local = processes on this machine, "
                             "debug = in this process")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the trials and executor settings, submit nothing")
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.overrides and not args.sweep:
        parser.error("KEY=VALUE overrides go with --sweep")
    if args.sweep:
        submit(args.sweep, cluster=args.cluster, dry_run=args.dry_run, overrides=args.overrides)
    elif args.status:
        table, _ = status_table(args.status)
        print(table)
        summarize(args.status)
    else:
        summarize(args.summarize)
    return 0

