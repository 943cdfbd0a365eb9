"""The paper's analysis tables from trained runs, this machine's figures beside the paper's.

`python launch/tables.py norms --maml runs/MAML_RUN --hypermaml runs/HYPERMAML_RUN`
  Table 3: the mean norm of the classifier's weight and bias updates over the test tasks.
`python launch/tables.py steps --maml runs/MAML_RUN --hypermaml runs/HYPERMAML_RUN`
  Tables 4 / 8: seconds and accuracy of the test tasks for MAML at K = 0, 1, 2, 3, 4, 5, 10, 25,
  50, 100 inner steps (--steps) and for HyperMAML; writes steps.json and steps.png (accuracy vs
  seconds) into --out (default: <maml run>/steps).
Both take --episodes and --repeats (default: each run's eval.test_episodes and eval.test_repeats).
`python launch/tables.py seeds RUN [RUN ...]`
  The comparison over seeds: finished runs grouped by experiment (configs equal but for the seed
  and how a run is watched), each run's test and best epoch, each experiment's mean ± sample std
  over its seeds; writes seeds.json and seeds.png (validation curves) into --out (default:
  <first run's folder>/../seeds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hmaml.errors import HmamlError, one_line_errors
from hmaml.tables import STEPS


def _steps(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmaml tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("norms", "Table 3: classifier update magnitudes"),
                       ("steps", "Tables 4 / 8: time and accuracy vs MAML's inner steps")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--maml", required=True, help="a trained MAML run directory")
        sub.add_argument("--hypermaml", required=True, help="a trained HyperMAML run directory")
        sub.add_argument("--episodes", type=int, help="test tasks per repeat")
        sub.add_argument("--repeats", type=int, help="independent lists of test tasks")
        if name == "steps":
            sub.add_argument("--steps", type=_steps, default=",".join(map(str, STEPS)),
                             help="MAML inner steps to test (default: %(default)s)")
            sub.add_argument("--out", help="folder for steps.json and steps.png "
                                           "(default: <maml run>/steps)")
    text = "the comparison over seeds of finished runs"
    seeds = commands.add_parser("seeds", help=text, description=text)
    seeds.add_argument("runs", nargs="+", help="finished run directories")
    seeds.add_argument("--out", help="folder for seeds.json and seeds.png "
                                     "(default: <first run's folder>/../seeds)")
    args = parser.parse_args(argv)
    for flag in ("episodes", "repeats"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise HmamlError(f"--{flag}={getattr(args, flag)} must be at least 1")
    from hmaml import tables

    if args.command == "seeds":
        out = Path(args.out) if args.out else Path(args.runs[0]).resolve().parent / "seeds"
        groups = tables.seeds_report(args.runs, out)
        print("\n".join(tables.seeds_lines(groups)))
        print(f"wrote {out / 'seeds.json'} and {out / 'seeds.png'}")
    elif args.command == "norms":
        rows = tables.update_norm_rows(args.maml, args.hypermaml, episodes=args.episodes,
                                   repeats=args.repeats)
        print("\n".join(tables.norms_lines(rows)))
    else:
        out = Path(args.out) if args.out else Path(args.maml) / "steps"
        rows = tables.steps_table(args.maml, args.hypermaml, steps=args.steps,
                                  episodes=args.episodes, repeats=args.repeats, out_dir=out)
        print("\n".join(tables.steps_lines(rows)))
        print(f"wrote {out / 'steps.json'} and {out / 'steps.png'}")
    return 0

