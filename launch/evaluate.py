"""Test a run's best checkpoint on the fixed test episodes, optionally over several seeds.

`python launch/evaluate.py --run runs/cub5 --episodes 600 --seeds 5` prints each seed's
accuracy ± 95% CI and the mean ± std of the seed means; writes RUN/evaluate.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from hmaml.errors import one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory (runs/<name>)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="test episodes per seed (default: the run's eval.test_episodes)")
    parser.add_argument("--seeds", type=int, default=1, help="number of episode lists")
    args = parser.parse_args(argv)
    from hmaml.evaluate import evaluate_run

    summary = evaluate_run(args.run, args.episodes, args.seeds)
    for row in summary["per_seed"]:
        print(f"seed {row['seed']}: {row['acc']:.2f} ± {row['ci95']:.2f} % "
              f"({row['episodes']} episodes)")
    print(f"{summary['run_dir']} (best epoch {summary['best_epoch']}): "
          f"{summary['mean']:.2f} ± {summary['std']:.2f} % over {args.seeds} seed(s)")
    print(json.dumps({"mean": summary["mean"], "std": summary["std"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
