"""Register a trained run's model in the MLflow model registry, and point an alias at it.

    hmaml register --run runs/omni_emnist1 --name omni-emnist-1shot --alias champion

The run's MLflow model (logged at the end of training with ``tracking.log_model``, or logged now
from the run folder when it was not) becomes a new version of ``--name``, tagged with its test
accuracy, method, dataset and commit; ``--alias`` moves that alias to it. The store is the run's
own (its ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db`` in the
current folder) unless ``--tracking-uri`` names another. Then:

    hmaml predict --model models:/omni-emnist-1shot@champion --support task/ --query q/
    mlflow models serve -m models:/omni-emnist-1shot@champion --env-manager local
"""

from __future__ import annotations

import argparse

from hmaml.errors import HmamlError, one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmaml register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run folder (runs/<name>)")
    parser.add_argument("--name", required=True, help="the registered model's name")
    parser.add_argument("--alias", default=None, help="an alias to move to the new version")
    parser.add_argument("--tracking-uri", default=None,
                        help="the MLflow store (default: the run's own)")
    args = parser.parse_args(argv)
    if not args.name.strip() or (args.alias is not None and not args.alias.strip()):
        raise HmamlError("--name and --alias must not be empty")
    from hmaml.mlflow_model import register_run

    run_id, version = register_run(args.run, args.name, args.alias, args.tracking_uri)
    uri = f"models:/{args.name}@{args.alias}" if args.alias else f"models:/{args.name}/{version}"
    print(f"{args.run} (MLflow run {run_id}) is version {version} of {args.name}"
          + (f", alias {args.alias}" if args.alias else ""))
    print(f"  serve it: mlflow models serve -m {uri} --env-manager local")
    return 0
