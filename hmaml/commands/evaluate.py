"""Test a run's best checkpoint with the test protocol (the hypernetwork alone for HyperMAML).

`python launch/evaluate.py --run runs/cub5 --episodes 600 --repeats 5` tests 5 independent lists
of 600 episodes and prints each one's accuracy ± 95 % CI and the mean ± std of the five means (the
paper's ±); writes RUN/evaluate.json. Defaults: the run's eval.test_episodes and eval.test_repeats.
`--override method.inner_steps=10` tests a MAML run at 10 inner steps (any key that does not fix
the trained parameters' shapes; repeatable); the seconds each repeat took are printed too.
"""

from __future__ import annotations

import argparse
import json

from hmaml.errors import HmamlError, one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmaml evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory (runs/<name>)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="test episodes per list (default: the run's eval.test_episodes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="independent episode lists (default: the run's eval.test_repeats)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="test with this config value, e.g. method.inner_steps=10 "
                             "(repeatable; shape-fixing keys are refused)")
    args = parser.parse_args(argv)
    for flag in ("episodes", "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise HmamlError(f"--{flag}={getattr(args, flag)} must be at least 1")
    from hmaml.train.protocol import evaluate_run

    summary = evaluate_run(args.run, args.episodes, args.repeats, args.override)
    if args.override:
        print("overrides: " + " ".join(args.override))
    for i, (row, seconds) in enumerate(zip(summary["test_repeats"], summary["test_seconds"],
                                           strict=True)):
        print(f"repeat {i + 1}: {row['acc']:.2f} ± {row['ci95']:.2f} % "
              f"({summary['test_episodes']} episodes, {seconds:.2f} s)")
    print(f"{summary['run_dir']}:", *summary["lines"], sep="\n")
    print(json.dumps({"mean": summary["test_acc"], "std": summary["test_std"],
                      "tested_p": summary["tested_p"]}))
    return 0

