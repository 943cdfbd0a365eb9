"""What one few-shot request costs a trained run served as an MLflow model (prints figures).

A request is one N-way K-shot task of random PNG images at the run's stored size (``--queries``
per class), as :mod:`hmaml.mlflow_model` documents. Three timings of the same request, median and
90th percentile over ``--requests`` rounds, all in one process's run so that their ratios hold:

- ``adapt``: ``load_run(...).adapt(support).predict_proba(query)`` on decoded images: the
  method's own work (one hypernetwork pass for HyperMAML, inner steps for MAML);
- ``pyfunc``: the loaded MLflow model's ``predict`` on the request frame (base64 and PNG
  decoding, schema enforcement, the answer frame);
- ``http``: a POST to ``/invocations`` of ``mlflow models serve --env-manager local`` on
  127.0.0.1 (JSON both ways), after the server's start-up, which is reported too.

The model is logged into a temporary SQLite store; the run folder is only read.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hmaml.errors import HmamlError
from hmaml.train.rundir import RunDir


def _timings(fn: Callable[[], Any], rounds: int) -> dict[str, float]:
    fn()  # the first call builds kernels and caches
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times),
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))]}


def measure(run_dir: Path, queries: int, rounds: int, http: bool) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    from hmaml.mlflow_model import example_task, log_model, served
    from hmaml.predict import load_run

    if not RunDir(run_dir).best.is_file():
        raise HmamlError(f"--run {run_dir}: no best.pt (not a trained run folder)")
    run = load_run(run_dir, device="cpu")
    n_way, n_shot, image = run.n_way, run.cfg.data.n_shot, run.image
    frame = example_task(image.stored_size, image.channels, n_way, n_shot, queries)
    pil = {c: [Image.open(io.BytesIO(base64.b64decode(x))) for x in frame[c][0]]
           for c in ("support", "query")}
    labels = list(frame["labels"][0])
    out: dict[str, Any] = {"run": str(run_dir), "method": run.cfg.method.name,
                           "task": f"{n_way}-way {n_shot}-shot, {queries} queries a class "
                                   f"({n_way * queries}), {image.stored_size} px",
                           "threads": torch.get_num_threads()}
    out["adapt"] = _timings(lambda: run.adapt(pil["support"], labels).predict_proba(
        pil["query"]), rounds)
    with tempfile.TemporaryDirectory(prefix="hmaml-bench-serve-") as tmp:
        store = f"sqlite:///{tmp}/mlruns.db"
        client = MlflowClient(store)
        run_id = client.create_run(client.create_experiment("bench-serve")).info.run_id
        model_uri = log_model(run_dir, store, run_id)
        mlflow.set_tracking_uri(store)
        try:
            model = mlflow.pyfunc.load_model(model_uri)
        finally:  # None unsets it: mlflow takes None, its annotation omits it
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        out["pyfunc"] = _timings(lambda: model.predict(frame), rounds)
        if http:
            body = json.dumps({"dataframe_records": frame.to_dict(orient="records")}).encode()
            out["request_kb"] = round(len(body) / 1024, 1)
            with served(model_uri, store, Path(tmp) / "serve.log") as (url, started):
                def post() -> None:
                    request = urllib.request.Request(f"{url}/invocations", body,
                                                     {"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        answer.read()

                out["http"] = {**_timings(post, rounds), "server_start_s": round(started, 1)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmaml bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a trained run folder")
    parser.add_argument("--queries", type=int, default=15, help="queries per class (15)")
    parser.add_argument("--requests", type=int, default=50, help="timed rounds (50)")
    parser.add_argument("--no-http", action="store_true", help="skip mlflow models serve")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.requests < 1:
        raise HmamlError("--queries and --requests must be at least 1")
    result = measure(args.run, args.queries, args.requests, not args.no_http)
    for name in ("adapt", "pyfunc", "http"):
        if name in result:
            t = result[name]
            print(f"{name:7s} {t['median_ms']:8.1f} ms median  {t['p90_ms']:8.1f} ms p90")
    print(json.dumps(result))
