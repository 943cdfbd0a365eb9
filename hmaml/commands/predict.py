"""Classify your own images with a trained run, adapted to your own support set.

    hmaml predict --run runs/omni_emnist1 --support my_task/ --query q1.png q2.png more_queries/
    hmaml predict --model models:/omni-emnist-1shot@champion --support my_task/ --query q/

``--model`` takes a model from the MLflow registry (``models:/NAME@alias``, ``models:/NAME/3``)
or a run's logged model (``runs:/<run id>/model``) from ``--tracking-uri`` (default:
``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db`` in the current folder) instead of a run
folder.

``--support`` holds one folder per class (the folder name is the class) with the same number of
images each, at least the run's K (n_shot); the run classifies exactly its N (n_way) classes.
``--query`` takes image files and folders of images. Writes a CSV (file, predicted class, one
probability column per class; ``--out``) and prints a table. ``--norm support`` normalises the
queries with the support set's statistics, so each image is classified on its own; the default,
``transductive``, normalises the queries together, as the run was tested (see docs/tracking.md).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from pathlib import Path

from hmaml.errors import HmamlError, one_line_errors
from hmaml.methods.base import QUERY_NORMS

SHOWN = 20  # rows of the printed table (all of them go to the CSV)
ListFiles = Callable[[Path], list[Path]]


def _support(folder: Path, shots: int, image_files: ListFiles) -> tuple[list[Path], list[str]]:
    if not folder.is_dir():
        raise HmamlError(f"--support {folder}: not a folder (one sub-folder per class expected)")
    images, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = image_files(class_dir)
        if len(files) < shots:
            raise HmamlError(f"{class_dir}: {len(files)} images, fewer than the run's "
                             f"K = {shots} per class")
        images += files
        labels += [class_dir.name] * len(files)
    if not images:
        raise HmamlError(f"--support {folder}: no class folders with images")
    return images, labels


def _queries(paths: list[Path], image_files: ListFiles) -> list[Path]:
    out = []
    for path in paths:
        if path.is_dir():
            out += image_files(path)
        elif path.is_file():
            out.append(path)
        else:
            raise HmamlError(f"--query {path}: no such file or folder")
    if not out:
        raise HmamlError("--query: no images found")
    return out


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmaml predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run folder (runs/<name>)")
    source.add_argument("--model", help="an MLflow model URI (models:/NAME@alias, ...)")
    parser.add_argument("--tracking-uri", default=None,
                        help="the MLflow store of --model (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///mlruns.db here)")
    parser.add_argument("--support", required=True, type=Path,
                        help="a folder of class folders, K or more images each")
    parser.add_argument("--query", required=True, nargs="+", type=Path,
                        help="image files and folders of images to classify")
    parser.add_argument("--norm", choices=QUERY_NORMS, default="transductive",
                        help="query normalisation (default: %(default)s, as the run was tested)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"),
                        help="CSV to write (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: automatic)")
    args = parser.parse_args(argv)
    from hmaml.predict import image_files, load_run

    if args.model is not None:
        from hmaml.mlflow_model import download_model

        with download_model(args.model, args.tracking_uri) as folder:
            run = load_run(folder, norm=args.norm, device=args.device)
    else:
        run = load_run(args.run, norm=args.norm, device=args.device)
    images, labels = _support(args.support, run.cfg.data.n_shot, image_files)
    queries = _queries(args.query, image_files)
    classifier = run.adapt(images, labels)
    proba = classifier.predict_proba(queries)
    names = [str(c) for c in classifier.classes]
    best = proba.argmax(-1).tolist()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "predicted", *(f"p_{name}" for name in names)])
        for path, row, k in zip(queries, proba.tolist(), best, strict=True):
            writer.writerow([str(path), names[k], *(f"{p:.6f}" for p in row)])
    width = min(60, max(len(str(p)) for p in queries))
    print(f"{len(names)}-way {classifier.shots}-shot task adapted ({args.norm} normalisation); "
          f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'}")
    print(f"{'file':<{width}}  {'predicted':<16} probability")
    for path, row, k in list(zip(queries, proba.tolist(), best, strict=True))[:SHOWN]:
        print(f"{str(path)[-width:]:<{width}}  {names[k]:<16} {row[k]:.3f}")
    if len(queries) > SHOWN:
        print(f"... {len(queries) - SHOWN} more")
    print(f"wrote {args.out}")
    return 0
