"""A trained run as an MLflow model: the pyfunc flavour, its logging, registry and download.

The model holds the run's tested checkpoint (``best.pt``), its config, image spec and test record
as the artifact ``run``; loading it is :func:`hmaml.load_run` on that folder, so the served model,
``hmaml predict`` and ``load_run(...).adapt(...)`` are one implementation.

A request is a DataFrame, one row per few-shot task (see :func:`task_frame`):

=========== ============ ==================================================================
column      type         what
=========== ============ ==================================================================
``support`` list of str  the support images, each an image file (PNG, JPEG, ...) in base64
``labels``  list of str  the class of each support image (N classes, K or more images each)
``query``   list of str  the query images, base64 image files
=========== ============ ==================================================================

and the parameter ``norm`` (``transductive``, as the run was tested, or ``support``). The answer
has one row per task: ``classes`` (the class order of the probabilities, as first seen in
``labels``), ``predicted`` (per query) and ``probabilities`` (per query, one per class). A task
the run cannot classify (wrong number of classes, unreadable image) is refused with one line:
``MlflowException`` with ``INVALID_PARAMETER_VALUE``, an HTTP 400 from ``mlflow models serve``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
from PIL import Image, UnidentifiedImageError

from hmaml.config import config_from_yaml
from hmaml.errors import HmamlError, first_line
from hmaml.files import write_json_atomic
from hmaml.methods.base import QUERY_NORMS
from hmaml.predict import TrainedRun, load_run, run_image_spec
from hmaml.train.checkpoint import load_checkpoint
from hmaml.train.rundir import RunDir
from hmaml.train.tracking import NullTracker, Tracker, store_uri, tracking_uri

#: The model's name inside its run (``runs:/<run id>/model``).
MODEL_NAME = "model"
#: The artifact holding the run folder's files the model needs.
RUN_ARTIFACT = "run"
#: The "models from code" file MLflow runs to build the model (it calls ``set_model``).
CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
#: The run's image spec beside its checkpoint in the model (size, channels, pipeline).
IMAGE_JSON = "image.json"
TASK_COLUMNS = ("support", "labels", "query")
ANSWER_COLUMNS = ("classes", "predicted", "probabilities")
#: Registry tags of a version, read from its MLflow run.
VERSION_TAGS = ("test_acc", "method", "dataset", "commit")


# --- requests ---------------------------------------------------------------------------------


def encode_image(image: str | Path | bytes) -> str:
    """An image file (a path or its bytes) as the base64 text a request carries."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


def task_frame(support: Sequence[str | Path | bytes], labels: Sequence[str],
               query: Sequence[str | Path | bytes]) -> pd.DataFrame:
    """A one-task request: image files (paths or bytes) with their labels, and the queries."""
    return pd.DataFrame({"support": [[encode_image(x) for x in support]],
                         "labels": [[str(label) for label in labels]],
                         "query": [[encode_image(x) for x in query]]})


def signature() -> ModelSignature:
    """The request and answer schema (see the module docstring) and the ``norm`` parameter."""
    texts = Array(DataType.string)
    return ModelSignature(
        inputs=Schema([ColSpec(texts, name) for name in TASK_COLUMNS]),
        outputs=Schema([ColSpec(texts, "classes"), ColSpec(texts, "predicted"),
                        ColSpec(Array(Array(DataType.double)), "probabilities")]),
        params=ParamSchema([ParamSpec("norm", DataType.string, "transductive")]))


def example_task(stored_size: int, channels: int, n_way: int, n_shot: int,
                 n_query: int = 1) -> pd.DataFrame:
    """A task of random images at the run's stored size, ``n_query`` queries a class (the
    model's input example; a benchmark's request)."""
    rng = np.random.default_rng(0)

    def png() -> bytes:
        pixels = rng.integers(0, 256, (stored_size, stored_size, channels), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, "PNG")
        return buffer.getvalue()

    labels = [f"class{c}" for c in range(n_way) for _ in range(n_shot)]
    return task_frame([png() for _ in labels], labels, [png() for _ in range(n_way * n_query)])


def _decode(text: Any, where: str) -> Image.Image:
    """A base64 image file as a PIL image (decoded and checked here, so that a bad one is named
    by its position)."""
    try:
        data = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise HmamlError(f"{where}: not base64 text") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise HmamlError(f"{where}: not an image file Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise HmamlError(f"{where}: not a readable image ({exc})") from None
    return image


def _column(row: Any, name: str, index: int) -> list[Any]:
    value = row[name]
    if value is None or isinstance(value, str) or not hasattr(value, "__len__"):
        raise HmamlError(f"task {index}: {name!r} must be a list")
    return list(value)


def answer_task(run: TrainedRun, row: Any, index: int) -> dict[str, list[Any]]:
    """The answer of one request row (a mapping with :data:`TASK_COLUMNS`)."""
    support, labels, query = (_column(row, name, index) for name in TASK_COLUMNS)
    images = [_decode(x, f"task {index}, support image {i}") for i, x in enumerate(support)]
    queries = [_decode(x, f"task {index}, query image {i}") for i, x in enumerate(query)]
    if not queries:
        raise HmamlError(f"task {index}: no query images")
    try:
        classifier = run.adapt(images, [str(label) for label in labels])
        proba = classifier.predict_proba(queries)
    except HmamlError as exc:
        raise HmamlError(f"task {index}: {exc}") from None
    names = [str(c) for c in classifier.classes]
    return {"classes": names, "predicted": [names[int(k)] for k in proba.argmax(-1)],
            "probabilities": proba.double().tolist()}


class FewShotTaskModel(PythonModel):
    """The pyfunc model: adapts the run to each request's support set and classifies its
    queries. The run is loaded once per normalisation asked for."""

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._runs: dict[str, TrainedRun] = {}

    def load_context(self, context: PythonModelContext) -> None:
        self._folder = Path(context.artifacts[RUN_ARTIFACT])
        self._run("transductive")

    def _run(self, norm: str) -> TrainedRun:
        if norm not in QUERY_NORMS:
            raise HmamlError(f"norm={norm!r}: choose one of {', '.join(QUERY_NORMS)}")
        if norm not in self._runs:
            assert self._folder is not None, "load_context first"
            self._runs[norm] = load_run(self._folder, norm=norm)
        return self._runs[norm]

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            run = self._run(str((params or {}).get("norm", "transductive")))
            frame = pd.DataFrame(model_input)
            missing = [c for c in TASK_COLUMNS if c not in frame.columns]
            if missing:
                raise HmamlError(f"the request lacks the column(s) {', '.join(missing)} (a task "
                                 f"is {', '.join(TASK_COLUMNS)})")
            rows = [answer_task(run, row, i) for i, (_, row) in enumerate(frame.iterrows())]
        except HmamlError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame(rows, columns=list(ANSWER_COLUMNS))


# --- logging and the registry -------------------------------------------------------------------


@contextmanager
def _store(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``uri`` for the block (tracking and registry), then back;
    artifact progress bars only on a terminal."""
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:  # None unsets it: mlflow takes None, its annotation omits it
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]


def _requirements() -> list[str]:
    """The serving environment: this hmaml, torch and MLflow at the versions that logged it."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("hmaml", "torch", "mlflow", "pillow", "numpy"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return out


def _stage(run_dir: Path, out: Path) -> tuple[Path, pd.DataFrame]:
    """The files the model needs, copied from the run folder (the tested checkpoint, its config,
    its image spec and its test record), and an input example of the run's shape."""
    rd = RunDir(run_dir)
    if not rd.best.is_file():
        raise HmamlError(f"{rd.path}: no {rd.best.name} to make a model of (the run has not "
                         "validated an epoch)")
    folder = out / RUN_ARTIFACT
    folder.mkdir(parents=True)
    staged = RunDir(folder)
    shutil.copy2(rd.best, staged.best)
    state = load_checkpoint(staged.best, None)
    cfg = config_from_yaml(state["config_yaml"], str(rd.best))
    image = run_image_spec(state, cfg)
    staged.config.write_text(state["config_yaml"])
    write_json_atomic(folder / IMAGE_JSON, image.as_dict())
    if rd.test.is_file():
        shutil.copy2(rd.test, staged.test)
    return folder, example_task(image.stored_size, image.channels, cfg.data.n_way,
                                cfg.data.n_shot)


def log_model(run_dir: str | Path, uri: str, run_id: str) -> str:
    """Log ``run_dir``'s tested checkpoint as the pyfunc model ``model`` of MLflow run
    ``run_id`` at ``uri``; returns the model's URI (``models:/<model id>``)."""
    with tempfile.TemporaryDirectory(prefix="hmaml-model-") as tmp:
        folder, example = _stage(Path(run_dir), Path(tmp))
        with _store(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(CODE_FILE),
                artifacts={RUN_ARTIFACT: str(folder)}, signature=signature(),
                input_example=example, pip_requirements=_requirements())
    return info.model_uri


def log_run_model(tracker: Tracker | NullTracker, run_dir: str | Path,
                  register: str | None = None) -> str | None:
    """Log the run folder's tested checkpoint as the tracked run's MLflow model (and register it
    as a new version of ``register``); returns what was done, for the closing summary (None when
    the run is not tracked). A failure costs one warning and the model, not the run."""
    if not tracker.active:
        return None
    assert tracker.uri is not None and tracker.run_id is not None
    try:
        done = f"MLflow model {log_model(run_dir, tracker.uri, tracker.run_id)}"
        if register:
            version = register_model(tracker.uri, tracker.run_id, register)
            done += f", registered as models:/{register}/{version}"
        return done
    except Exception as exc:
        warnings.warn(f"the run's MLflow model was not logged or registered "
                      f"({type(exc).__name__}: {first_line(exc, 300)}); its checkpoint "
                      f"stays in {run_dir}", RuntimeWarning, stacklevel=2)
        return None


def _version_tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    """What a registry user sorts and filters versions by, from the MLflow run."""
    run = client.get_run(run_id)
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    packs = [Path(params[k]).name for k in ("data.train_pack", "data.eval_pack")
             if params.get(k) not in (None, "", "null")]  # eval_pack null: the training pack
    out = {"test_acc": f"{metrics['test_acc']:.4f}" if "test_acc" in metrics else None,
           "method": params.get("method.name"),
           "dataset": " -> ".join(dict.fromkeys(packs)) or None,
           "commit": tags.get("mlflow.source.git.commit")}
    return {k: v for k, v in out.items() if v is not None}


def logged_model_uri(client: MlflowClient, run_id: str) -> str | None:
    """The URI of run ``run_id``'s model ``model``, or None when it logged none."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    return f"models:/{found[0].model_id}" if found else None


def register_model(uri: str, run_id: str, name: str, alias: str | None = None,
                   reuse: bool = False) -> str:
    """Register run ``run_id``'s model as a new version of ``name`` (tagged with
    :data:`VERSION_TAGS`) and point ``alias`` at it; returns the version. ``reuse``: a version
    of ``name`` already made from this run is taken instead of a new one."""
    client = MlflowClient(uri, registry_uri=uri)
    source = logged_model_uri(client, run_id)
    if source is None:
        raise HmamlError(f"MLflow run {run_id} has no logged model '{MODEL_NAME}'")
    known = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'") \
        if reuse else []
    if known:
        version = str(max(int(v.version) for v in known))
    else:
        with _store(uri):
            version = mlflow.register_model(source, name).version
    for key, value in _version_tags(client, run_id).items():
        client.set_model_version_tag(name, version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


def register_run(run_dir: str | Path, name: str, alias: str | None = None,
                 uri: str | None = None) -> tuple[str, str]:
    """``hmaml register``: the run folder's MLflow run gets its model (logged now when the run
    did not log one) and the model a new version of ``name``; returns (run id, version)."""
    rd = RunDir(run_dir)
    try:
        run_id = rd.mlflow_run_id.read_text().strip()
    except OSError:
        raise HmamlError(f"{rd.path}: no MLflow run ({rd.mlflow_run_id.name} is missing: the "
                         "run was trained with tracking.enabled=false)") from None
    if uri is None:
        try:
            uri = tracking_uri(config_from_yaml(rd.config.read_text(), str(rd.config)))
        except OSError:
            raise HmamlError(f"{rd.path}: no {rd.config.name} (not a run folder)") from None
    client = MlflowClient(uri, registry_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise HmamlError(f"{rd.path}: its MLflow run {run_id} is not in {uri} (pass the store "
                         "with --tracking-uri)") from None
    if logged_model_uri(client, run_id) is None:
        log_model(rd.path, uri, run_id)
    return run_id, register_model(uri, run_id, name, alias)


@contextmanager
def download_model(model_uri: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """A registered or logged model (``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/...``)
    downloaded to a temporary folder for the block: the run folder inside it, for
    :func:`load_run` (which reads all it needs at once)."""
    uri = store_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="hmaml-model-") as out:
        try:
            with _store(uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                                 dst_path=out))
        except MlflowException as exc:
            raise HmamlError(f"{model_uri}: not found in {uri} ({first_line(exc, 300)})") from None
        folder = local / "artifacts" / RUN_ARTIFACT
        if not RunDir(folder).best.is_file():
            raise HmamlError(f"{model_uri}: not an hmaml model (no artifacts/{RUN_ARTIFACT}/"
                             f"{RunDir(folder).best.name})")
        yield folder


@contextmanager
def served(model_uri: str, tracking_uri: str, log: Path, timeout_s: float = 180.0,
           env: dict[str, str] | None = None) -> Iterator[tuple[str, float]]:
    """``mlflow models serve --env-manager local`` of ``model_uri`` on a free port of 127.0.0.1
    (output to ``log``), ready on entry (``/ping`` answers): yields its URL and the seconds its
    start took; stopped on exit. A server that exits or stays silent is one line."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    start = time.perf_counter()
    with log.open("wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, env={
                                    **os.environ, **(env or {}),
                                    "MLFLOW_TRACKING_URI": tracking_uri})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise HmamlError(f"mlflow models serve exited with {proc.returncode}: {tail[0]} "
                                 f"(see {log})")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.perf_counter() - start > timeout_s:
                    raise HmamlError(f"mlflow models serve did not answer in {timeout_s:.0f} s "
                                     f"(see {log})") from None
                time.sleep(0.2)
        yield url, time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

