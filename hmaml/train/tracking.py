"""MLflow tracking: with :mod:`hmaml.mlflow_model` (the run as a model), the only module that
imports mlflow (lazily, so ``import hmaml`` stays light).

Only the main process tracks; other ranks, and runs with ``tracking.enabled: false``, get a
:class:`NullTracker` with the same methods. Tracking never stops training: if the store is
unreachable or any MLflow call raises, :class:`Tracker` warns once and turns into a no-op, and the
run goes on with its local files (checkpoints, history, plots in ``run_dir``).

What a run holds: every config key as a param (dotted, values cut to MLflow's length limit),
tags (git commit, host, hmaml version, plus the caller's: world size, pack fingerprints, ...),
the caller's metrics by step and artifacts. A resumed training run continues the same MLflow run:
its id is kept in ``run_dir/mlflow_run_id.txt``. The experiment gets one tag, hmaml's saved view
of the runs table (:func:`ensure_view`), which the printed link (:func:`ui_link`) opens; failing
to set it costs a warning and the view, not the tracking.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from hmaml.config import Config, flatten
from hmaml.errors import first_line
from hmaml.files import out_of_space, write_text_atomic
from hmaml.train.rundir import RunDir

STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow 3 limits (mlflow.utils.validation); used when that module cannot be read.
_PARAM_VALUE_MAX = 6000
_TAG_VALUE_MAX = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
# Fail fast on a dead server instead of MLflow's default ~7 retries with backoff (minutes); a
# user's own setting of these variables wins.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_PROBE_TIMEOUT_S = 5.0
#: Where ``mlflow ui`` serves a local store by default.
DEFAULT_UI = "http://127.0.0.1:5000"
#: Seconds between samples of MLflow's system metrics (one background thread, psutil).
SYSTEM_METRICS_EVERY_S = 10.0
#: The saved view of the runs table that hmaml's link opens: its key (URL parameter
#: ``viewStateShareKey``), the name the UI's "Views" menu lists, and its metric columns (the
#: test's mean accuracy and 95 % CI, the best validation accuracy, the checkpoint tested).
VIEW_KEY = "hmaml-accuracy"
VIEW_NAME = "hmaml: accuracy"
VIEW_METRICS = ("test_acc", "test_ci95", "best_val_acc")
# MLflow 3.17's UI keeps a saved view in this experiment tag + key; the value is an envelope
# {name, createdAt, updatedAt, state}, ``state`` being the JSON text of the runs page's state
# (its fields left out take their defaults). A column is "<group>.`<key>`".
_VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns.db``."""
    return store_uri(cfg.tracking.uri)


def store_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def ui_link(uri: str, experiment_id: str, ui_url: str | None = None, view: bool = True) -> str:
    """The MLflow UI's runs table of an experiment, in model-training mode, in hmaml's view.

    MLflow 3 opens an experiment on an empty GenAI overview ("No data available") unless the URL
    asks for ``workflowType=machine_learning``. ``view`` adds ``viewStateShareKey`` (the saved
    view :func:`ensure_view` writes), which shows the :data:`VIEW_METRICS` columns; the path
    names the runs tab because the redirect from the bare experiment page drops that parameter.
    The UI is the server itself for an http(s) store, else where ``mlflow ui`` serves it
    (``ui_url``).
    """
    base = ui_url or (uri if urlparse(uri).scheme in ("http", "https") else DEFAULT_UI)
    link = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return link + (f"&viewStateShareKey={VIEW_KEY}" if view else "")


def view_tag() -> tuple[str, str]:
    """The experiment tag (key, value) of hmaml's saved view of the runs table."""
    state = {"selectedColumns": [f"metrics.`{name}`" for name in VIEW_METRICS]}
    now = int(time.time() * 1000)
    value = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    return _VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(value)


def ensure_view(client: Any, experiment_id: str) -> bool:
    """Save hmaml's view of the runs table in the experiment, unless it holds one already (as
    written here, or as since changed in the UI). False, with a warning, when the store cannot
    read or set the tag: the link then opens MLflow's default columns, and the run goes on."""
    key, value = view_tag()
    try:
        if key not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, key, value)
    except Exception as exc:
        reason = first_line(exc, 300)
        warnings.warn(f"MLflow: the runs-table view {VIEW_KEY!r} of experiment {experiment_id} "
                      f"could not be saved ({type(exc).__name__}: {reason}); the link opens the "
                      f"default columns", RuntimeWarning, stacklevel=3)
        return False
    return True


def serve_hint(uri: str) -> str:
    """How to serve a local store's UI (empty for a server, which serves itself)."""
    if urlparse(uri).scheme in ("http", "https"):
        return ""
    return f"mlflow ui --backend-store-uri {uri}"


def ui_line(uri: str, link: str) -> str:
    """The printed ``MLflow: <link>`` line, with how to serve a local store."""
    hint = serve_hint(uri)
    return f"MLflow: {link}" + (f"  (serve it with: {hint})" if hint else "")


def make_tracker(cfg: Config, is_main_process: bool) -> Tracker | NullTracker:
    """A real tracker on the main process when tracking is enabled, a no-op one otherwise."""
    return Tracker() if is_main_process and cfg.tracking.enabled else NullTracker()


class NullTracker:
    """The tracker of non-main ranks and disabled tracking: every call does nothing."""

    run_id: str | None = None
    uri: str | None = None

    @property
    def active(self) -> bool:
        return False

    def start(self, cfg: Config, run_dir: str | Path, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> str | None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        return None

    def open(self, uri: str, experiment: str, name: str, params: Mapping[str, Any],
             tags: Mapping[str, Any] | None = None, **kw: Any) -> bool:
        return False

    def attach(self, uri: str, run_id: str, ui_url: str | None = None) -> bool:
        return False


class Tracker:
    """An MLflow run through ``MlflowClient`` (no global active-run state): a training run
    (:meth:`start`), a sweep's parent run (:meth:`open`), or a run taken up again to add to it
    (:meth:`attach`). A store that fails costs one warning saying ``consequence``; the caller
    goes on without tracking."""

    def __init__(self, consequence: str = "training goes on with its local files") -> None:
        self.run_id: str | None = None
        self.uri: str | None = None
        self.link: str | None = None  # the runs table of the run's experiment (ui_link)
        self.consequence = consequence
        self._client: Any = None
        self._experiment: str | None = None
        self._monitor: Any = None
        self._warned = False

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def start(self, cfg: Config, run_dir: str | Path, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> str | None:
        """Open (or, when ``run_dir`` holds a run id from this store, reopen) a training run.

        ``tags`` come from the caller (e.g. ``world_size``, pack fingerprints); git commit, host
        and hmaml version are added here. ``parent_run_id`` nests the run under a sweep's run.
        Returns the run id, or None when tracking is off for this run.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = RunDir(run_dir).mlflow_run_id
        try:
            known = id_file.read_text().strip() or None
        except OSError:
            known = None
        nest = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
        resumed = self.open(tracking_uri(cfg), cfg.tracking.experiment or cfg.name,
                            cfg.tracking.run_name or cfg.name, flatten(cfg), tags, run_id=known,
                            start_tags=nest, ui_url=cfg.tracking.ui_url)
        if self.active and self.run_id != known:
            write_text_atomic(id_file, f"{self.run_id}\n")
        if self.active and cfg.tracking.system_metrics:
            self._start_system_metrics(resumed)
        return self.run_id

    def open(self, uri: str, experiment: str, name: str, params: Mapping[str, Any],
             tags: Mapping[str, Any] | None = None, *, run_id: str | None = None,
             start_tags: Mapping[str, Any] | None = None, ui_url: str | None = None) -> bool:
        """Open run ``run_id`` again when this store has it (alive), else a new run ``name`` in
        ``experiment`` tagged with git commit, host, hmaml version and ``start_tags``; log the
        ``params`` it lacks (a reopened run's changed values go to the tag
        ``resume.changed_params``) and ``tags``. True when the run was reopened."""
        self.uri = uri
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            return self._open(experiment, name, {k: str(v) for k, v in params.items()},
                              dict(tags or {}), run_id, dict(start_tags or {}), ui_url)
        except Exception as exc:
            self._disable(exc)
            return False

    def attach(self, uri: str, run_id: str, ui_url: str | None = None) -> bool:
        """Take up an existing run (a sweep's parent, to add its summary); False, with one
        warning, when the store cannot give it."""
        self.uri = uri
        try:
            client, _ = _client(uri)
            self._experiment = client.get_run(run_id).info.experiment_id
            self._client, self.run_id = client, run_id
            self._make_link(ui_url)
        except Exception as exc:
            self._disable(exc)
        return self.active

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``{name: value}`` at ``step`` (epoch or optimizer step, as the caller chooses)."""
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(key, float(value), stamp, int(step)) for key, value in metrics.items()]
        self._guarded(self._log_batches, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags, e.g. milestones: warm-up end, switch end, LR drops, best epoch."""
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        limit = _limit("MAX_TAG_VAL_LENGTH", _TAG_VALUE_MAX)
        items = [RunTag(key, str(value)[:limit]) for key, value in tags.items()]
        self._guarded(self._log_batches, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's files) under ``artifact_path`` of the run."""
        if not self.active:
            return
        path = Path(path)
        method = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        self._guarded(method, self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if self._monitor is not None:
            self._guarded(self._monitor.finish)
            self._monitor = None
        if self.active:
            self._guarded(self._client.set_terminated, self.run_id, status)
        self._client = None

    # --- internals -----------------------------------------------------------------------

    def _start_system_metrics(self, resumed: bool) -> None:
        """MLflow's own sampler of CPU, memory, disk, network (and GPU where nvidia-ml-py is
        installed), logged as ``system/*`` metrics; a failure costs one warning, not the run."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_EVERY_S,
                                           resume_logging=resumed, tracking_uri=self.uri)
            monitor.start()
            self._monitor = monitor
        except Exception as exc:  # psutil missing, a store that refuses: tracking goes on
            warnings.warn(f"MLflow system metrics are off ({type(exc).__name__}: {exc})",
                          RuntimeWarning, stacklevel=3)

    def _open(self, experiment: str, name: str, params: dict[str, str], tags: dict[str, Any],
              run_id: str | None, start_tags: dict[str, Any], ui_url: str | None) -> bool:
        assert self.uri is not None
        client, sqlite_db = _client(self.uri)
        run = _existing_run(client, run_id)
        resumed = run is not None
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            old = run.data.params
            changed = [f"{k}: {old[k]} -> {v}" for k, v in params.items()
                       if k in old and old[k] != _cut_param(v)]
            params = {k: v for k, v in params.items() if k not in old}
            if changed:
                tags["resume.changed_params"] = "; ".join(changed)
        else:
            experiment_id = _experiment_id(client, experiment, sqlite_db)
            first = {"host": socket.gethostname(), "hmaml.version": _version(), **start_tags}
            commit = _git_commit()
            if commit:
                first["mlflow.source.git.commit"] = commit
            run = client.create_run(experiment_id, tags=first, run_name=name)
        self._client, self.run_id = client, run.info.run_id
        self._experiment = run.info.experiment_id
        from mlflow.entities import Param

        self._log_batches(params=[Param(k, _cut_param(v)) for k, v in params.items()])
        self.set_tags(tags)
        self._make_link(ui_url)
        return resumed

    def _make_link(self, ui_url: str | None) -> None:
        """The runs table of the experiment, in hmaml's saved view when it could be saved."""
        assert self.uri is not None and self._experiment is not None
        view = ensure_view(self._client, self._experiment)
        self.link = ui_link(self.uri, self._experiment, ui_url, view=view)

    def _log_batches(self, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
                     tags: Sequence[Any] = ()) -> None:
        for chunk in _chunks(metrics, _limit("MAX_METRICS_PER_BATCH", _METRICS_PER_BATCH)):
            self._client.log_batch(self.run_id, metrics=chunk)
        per_batch = _limit("MAX_PARAMS_TAGS_PER_BATCH", _PARAMS_PER_BATCH)
        for chunk in _chunks(params, per_batch):
            self._client.log_batch(self.run_id, params=chunk)
        for chunk in _chunks(tags, per_batch):
            self._client.log_batch(self.run_id, tags=chunk)

    def _guarded(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        self._client = None
        if not self._warned:
            self._warned = True
            reason = f"{type(exc).__name__}: {first_line(exc, 300)}"
            if out_of_space(exc):  # the store's disk, not the run's: the run goes on
                reason = f"no space left on device for its store; {reason}"
            warnings.warn(f"MLflow tracking at {self.uri} is off for the rest of this run "
                          f"({reason}); {self.consequence}", RuntimeWarning, stacklevel=3)


def _client(uri: str) -> tuple[Any, Path | None]:
    """An MlflowClient for ``uri`` and its SQLite file, if any: a server is probed first (fail
    fast rather than retry for minutes), a SQLite file's folder is created."""
    if urlparse(uri).scheme in ("http", "https"):
        _probe(uri)
    sqlite_db = _sqlite_path(uri)
    if sqlite_db is not None:
        sqlite_db.parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri), sqlite_db


def _probe(uri: str) -> None:
    """Raise at once if nothing answers at ``uri`` (any HTTP status counts as an answer)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"no MLflow server answers at {uri} ({exc})") from None


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):])
    return None if path in ("", ":memory:") else Path(path).resolve()


def _experiment_id(client: Any, name: str, sqlite_db: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if sqlite_db is not None:
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        location = (sqlite_db.parent / "mlartifacts" / folder).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent run (sweeps)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _existing_run(client: Any, run_id: str | None) -> Any:
    """Run ``run_id`` if this store has it (alive), else None."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def _git_commit() -> str | None:
    """HEAD of the repository holding this package, or None (no git, not a repo, no commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _version() -> str:
    from hmaml.train.checkpoint import hmaml_version

    return hmaml_version()


def _limit(name: str, fallback: int) -> int:
    try:
        from mlflow.utils import validation
    except ImportError:
        return fallback
    return int(getattr(validation, name, fallback))


def _cut_param(value: str) -> str:
    return value[:_limit("MAX_PARAM_VAL_LENGTH", _PARAM_VALUE_MAX)]


def _chunks(items: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])
