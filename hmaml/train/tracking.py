"""MLflow tracking: the only module that imports mlflow (lazily, so ``import hmaml`` stays light).

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
from hmaml.files import write_text_atomic
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
    return (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path.cwd() / 'mlruns.db'}")


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
        reason = _reason(exc)
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


def run_ui_link(uri: str, run_id: str, ui_url: str | None = None) -> str | None:
    """:func:`ui_link` of the experiment that holds ``run_id`` (None if the store cannot say),
    its view saved first (:func:`ensure_view`)."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment_id = client.get_run(run_id).info.experiment_id
    except Exception:  # an unreachable store: no link, the summary is printed all the same
        return None
    return ui_link(uri, experiment_id, ui_url, view=ensure_view(client, experiment_id))


def make_tracker(cfg: Config, is_main_process: bool) -> Tracker | NullTracker:
    """A real tracker on the main process when tracking is enabled, a no-op one otherwise."""
    return Tracker() if is_main_process and cfg.tracking.enabled else NullTracker()


class NullTracker:
    """The tracker of non-main ranks and disabled tracking: every call does nothing."""

    run_id: str | None = None

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


class Tracker:
    """MLflow run of one training run, through ``MlflowClient`` (no global active-run state)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.uri: str | None = None
        self.link: str | None = None  # the runs table of the run's experiment (ui_link)
        self._client: Any = None
        self._monitor: Any = None
        self._warned = False

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def start(self, cfg: Config, run_dir: str | Path, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> str | None:
        """Open (or, when ``run_dir`` holds a run id from this store, reopen) the MLflow run.

        ``tags`` come from the caller (e.g. ``world_size``, pack fingerprints); git commit, host
        and hmaml version are added here. ``parent_run_id`` nests the run under a sweep's run.
        Returns the run id, or None when tracking is off for this run.
        """
        self.uri = tracking_uri(cfg)
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            resumed = self._open(cfg, Path(run_dir), dict(tags or {}), parent_run_id)
        except Exception as exc:
            self._disable(exc)
        if self.active and cfg.tracking.system_metrics:
            self._start_system_metrics(resumed)
        if self.active:
            view = ensure_view(self._client, self._experiment)
            self.link = ui_link(self.uri, self._experiment, cfg.tracking.ui_url, view=view)
        return self.run_id

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

    def _open(self, cfg: Config, run_dir: Path, tags: dict[str, Any],
              parent_run_id: str | None) -> bool:
        """Open or reopen the run; True when it was reopened (a resumed run)."""
        uri = self.uri
        assert uri is not None
        client, sqlite_db = _client(uri)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = RunDir(run_dir).mlflow_run_id
        params = flatten(cfg)
        run = _existing_run(client, id_file)
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
            experiment_id = _experiment_id(client, cfg.tracking.experiment or cfg.name,
                                           sqlite_db)
            start_tags = {"host": socket.gethostname(), "hmaml.version": _version()}
            commit = _git_commit()
            if commit:
                start_tags["mlflow.source.git.commit"] = commit
            if parent_run_id:
                start_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(experiment_id, tags=start_tags,
                                    run_name=cfg.tracking.run_name or cfg.name)
            write_text_atomic(id_file, run.info.run_id + "\n")
        self._client, self.run_id = client, run.info.run_id
        self._experiment = run.info.experiment_id
        from mlflow.entities import Param

        self._log_batches(params=[Param(k, _cut_param(v)) for k, v in params.items()])
        self.set_tags(tags)
        return resumed

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
            reason = _reason(exc)
            warnings.warn(f"MLflow tracking at {self.uri} is off for the rest of this run "
                          f"({type(exc).__name__}: {reason}); training goes on with its local "
                          f"files", RuntimeWarning, stacklevel=3)


def _reason(exc: BaseException) -> str:
    """The first line of an error's message (its type when empty), cut to 300 characters."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


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


def _existing_run(client: Any, id_file: Path) -> Any:
    """The run named in ``id_file`` if this store has it (alive), else None."""
    try:
        run_id = id_file.read_text().strip()
    except OSError:
        return None
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


# --- sweeps: one parent run, one child run per trial -----------------------------------------


def open_sweep_run(uri: str, experiment: str, name: str, run_id: str | None,
                   params: Mapping[str, Any], tags: Mapping[str, Any]) -> str | None:
    """The id of a sweep's parent run: ``run_id`` when this store still has it, else a new run.

    Like :class:`Tracker`, a store that cannot be reached only warns: the sweep then goes on
    without a parent run (None).
    """
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        client, sqlite_db = _client(uri)
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage != "deleted":
                    return run_id
            except MlflowException:
                pass
        experiment_id = _experiment_id(client, experiment, sqlite_db)
        start_tags = {"host": socket.gethostname(), "hmaml.version": _version(),
                      "hmaml.kind": "sweep"}
        commit = _git_commit()
        if commit:
            start_tags["mlflow.source.git.commit"] = commit
        run = client.create_run(experiment_id, tags=start_tags, run_name=name)
        new_id = run.info.run_id
        limit = _limit("MAX_PARAM_VAL_LENGTH", _PARAM_VALUE_MAX)
        per_batch = _limit("MAX_PARAMS_TAGS_PER_BATCH", _PARAMS_PER_BATCH)
        for chunk in _chunks([Param(k, str(v)[:limit]) for k, v in params.items()], per_batch):
            client.log_batch(new_id, params=chunk)
        tag_limit = _limit("MAX_TAG_VAL_LENGTH", _TAG_VALUE_MAX)
        for chunk in _chunks([RunTag(k, str(v)[:tag_limit]) for k, v in tags.items()],
                             per_batch):
            client.log_batch(new_id, tags=chunk)
        return new_id
    except Exception as exc:
        _warn_sweep(uri, exc)
        return None


def close_sweep_run(uri: str, run_id: str, artifacts: Sequence[str | Path],
                    finished: bool) -> None:
    """Upload the sweep's summary files to its parent run; mark it FINISHED when ``finished``."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        if finished:
            client.set_terminated(run_id, "FINISHED")
    except Exception as exc:
        _warn_sweep(uri, exc)


def child_runs(uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs nested under ``parent_run_id``: id, name, status, params, metrics and tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000)
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "params": dict(r.data.params), "metrics": dict(r.data.metrics),
             "tags": dict(r.data.tags)} for r in runs]


def run_artifacts(uri: str, run_id: str) -> list[str]:
    """Paths of the files logged at the top level of a run's artifacts."""
    from mlflow import MlflowClient

    return sorted(f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(run_id))


def _warn_sweep(uri: str, exc: BaseException) -> None:
    reason = _reason(exc)
    warnings.warn(f"MLflow tracking at {uri} is unavailable for the sweep's parent run "
                  f"({type(exc).__name__}: {reason}); the trials still run", RuntimeWarning,
                  stacklevel=3)
