"""MLflow tracking against a temporary SQLite store: what is logged reads back, resume continues
the same run, a dead server costs one warning and no exception, and the learning-curve plot."""

from __future__ import annotations

import json
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hmaml.config import flatten, load_config
from hmaml.plots import lr_drops, phase_spans, plot_learning_curve
from hmaml.train.rundir import RunDir
from hmaml.train.tracking import (
    VIEW_KEY,
    VIEW_METRICS,
    VIEW_NAME,
    NullTracker,
    Tracker,
    make_tracker,
    ui_link,
)


@contextmanager
def no_tracking_warning() -> Iterator[None]:
    """Fail if the tracker gave up (other libraries' warnings are left alone)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [str(w.message) for w in caught if "off for the rest" in str(w.message)]
    assert not ours


HISTORY = [{"epoch": e, "train_loss": 1.6 - 0.1 * e, "train_acc": 20 + 5 * e,
            "val_acc": 20 + 4 * e, "p": p, "lr": lr}
           for e, (p, lr) in enumerate([(1.0, 1e-2), (1.0, 1e-2), (0.75, 3e-3), (0.5, 3e-3),
                                        (0.25, 3e-3), (0.0, 9e-4), (0.0, 9e-4)])]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module: creating its schema takes seconds."""
    return tmp_path_factory.mktemp("mlflow") / "mlruns.db"


def test_logged_run_reads_back_and_resume_continues_it(store: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    long_pack = "shards/" + "x" * 7000
    cfg = load_config("quickstart", [f"tracking.uri={uri}", f"data.train_pack={long_pack}"])
    run_dir = tmp_path / "run"
    tracker = Tracker()
    with no_tracking_warning():
        run_id = tracker.start(cfg, run_dir, tags={"world_size": 2, "pack.train": "abc123"})
        tracker.log_metrics({"train/loss": 1.5, "val/acc": 0.4}, step=0)
        tracker.log_metrics({"train/loss": 1.2, "val/acc": 0.5}, step=1)
        tracker.set_tags({"milestone.warmup_end": 2})
        artifact = tmp_path / "curve.png"
        plot_learning_curve(HISTORY, artifact)
        tracker.log_artifact(artifact, "plots")
        tracker.end("FINISHED")
    assert run_id and RunDir(run_dir).mlflow_run_id.read_text().strip() == run_id

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    expected = flatten(cfg)
    expected["data.train_pack"] = long_pack[:6000]
    assert run.data.params == expected
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (0, 1.5), (1, 1.2)]
    tags = run.data.tags
    assert (tags["world_size"], tags["pack.train"], tags["milestone.warmup_end"]) == (
        "2", "abc123", "2")
    assert tags["host"] == socket.gethostname() and tags["mlflow.runName"] == "quickstart"
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/curve.png"]
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(store.parent.as_uri())  # beside the store, not cwd
    assert client.get_experiment(run.info.experiment_id).name == "quickstart"

    # resuming the training run reopens the same MLflow run; a changed param is reported
    resumed = load_config("quickstart", [f"tracking.uri={uri}", f"data.train_pack={long_pack}",
                                         "train.epochs=40"])
    again = Tracker()
    assert again.start(resumed, run_dir) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log_metrics({"train/loss": 1.0}, step=2)
    again.end("KILLED")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.params["train.epochs"] == "20"
    assert run.data.tags["resume.changed_params"] == "train.epochs: 20 -> 40"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2]

    # a sweep child in another run_dir is a new run under its parent
    child = Tracker()
    child_id = child.start(cfg, tmp_path / "child", parent_run_id=run_id)
    child.end()
    assert child_id != run_id
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == run_id


def test_failures_warn_once_and_never_raise(store: Path, tmp_path: Path, monkeypatch) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = load_config("quickstart", [f"tracking.uri=http://127.0.0.1:{port}"])
    tracker = Tracker()
    began = time.monotonic()
    with pytest.warns(RuntimeWarning, match=f"127.0.0.1:{port}.*off for the rest"):
        assert tracker.start(cfg, tmp_path / "run") is None
    with no_tracking_warning():
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.set_tags({"a": 1})
        tracker.log_artifact(tmp_path)
        tracker.end("FAILED")
    assert time.monotonic() - began < 10 and not tracker.active

    # a call that raises mid-run turns tracking off after one warning
    cfg = load_config("quickstart", [f"tracking.uri=sqlite:///{store}"])
    tracker = Tracker()
    tracker.start(cfg, tmp_path / "run2")
    assert tracker.active

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tracker._client, "log_batch", broken)
    with pytest.warns(RuntimeWarning, match="disk full"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    with no_tracking_warning():
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.end()


def test_null_tracker_for_other_ranks_and_disabled_tracking() -> None:
    cfg = load_config("quickstart")
    assert isinstance(make_tracker(cfg, is_main_process=True), Tracker)
    assert isinstance(make_tracker(cfg, is_main_process=False), NullTracker)
    off = load_config("quickstart", ["tracking.enabled=false"])
    null = make_tracker(off, is_main_process=True)
    assert isinstance(null, NullTracker) and null.start(off, "unused") is None
    public = {n for n in dir(Tracker) if not n.startswith("_")}
    assert public <= {n for n in dir(NullTracker) if not n.startswith("_")}


def test_learning_curve_phases_lr_drops_and_png(tmp_path: Path) -> None:
    assert phase_spans(HISTORY) == [(0.0, 2.0, "warm-up"), (2.0, 5.0, "switch")]
    assert lr_drops(HISTORY) == [2.0, 5.0]
    assert phase_spans([{"epoch": 0, "val_acc": 0.3}]) == [] == lr_drops([{"epoch": 0}])
    out = plot_learning_curve(HISTORY, tmp_path / "plots" / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curve([], tmp_path / "empty.png")


@pytest.mark.parametrize("enabled", [True, False])
def test_system_metrics_are_sampled_while_the_run_is_open(store: Path, tmp_path: Path,
                                                          monkeypatch, enabled: bool) -> None:
    """tracking.system_metrics: MLflow's sampler logs CPU and memory as system/* metrics while
    the run is open (sampling every 0.2 s here instead of 10 s), and stops with the run."""
    from mlflow import MlflowClient

    import hmaml.train.tracking as tracking

    monkeypatch.setattr(tracking, "SYSTEM_METRICS_EVERY_S", 0.2)
    uri = f"sqlite:///{store}"
    cfg = load_config("quickstart", [f"tracking.uri={uri}",
                                     f"tracking.system_metrics={str(enabled).lower()}"])
    tracker = Tracker()
    with no_tracking_warning():
        run_id = tracker.start(cfg, tmp_path / "run")
        time.sleep(1.5)
        tracker.end("FINISHED")
    assert tracker._monitor is None  # the sampler stopped with the run
    keys = set(MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics)
    system = {k for k in keys if k.startswith("system/")}
    if enabled:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} \
            <= system
    else:
        assert not system


def test_ui_links_land_on_the_runs_table_of_the_store_that_holds_them() -> None:
    from hmaml.train.tracking import serve_hint

    local = ui_link("sqlite:///runs/mlruns.db", "7")
    assert local == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                     "&viewStateShareKey=hmaml-accuracy")
    assert serve_hint("sqlite:///runs/mlruns.db") == (
        "mlflow ui --backend-store-uri sqlite:///runs/mlruns.db")
    server = ui_link("https://mlflow.lab:8443/", "3", view=False)
    assert server == "https://mlflow.lab:8443/#/experiments/3/runs?workflowType=machine_learning"
    assert serve_hint("https://mlflow.lab:8443/") == ""
    assert ui_link("sqlite:///x.db", "1", "http://gpu7:5050").startswith("http://gpu7:5050/#/")


def _view_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "could not be saved" in str(w.message)]


def test_the_experiment_holds_the_view_the_link_opens(store: Path, tmp_path: Path) -> None:
    """Starting a run saves hmaml's view of the runs table in its experiment once (a view since
    changed in the UI is kept), in the saved-view format MLflow 3.17's UI reads; the link names
    it. A sweep summary's link saves it too."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    key = f"mlflow.sharedViewState.{VIEW_KEY}"
    cfg = load_config("quickstart", [f"tracking.uri={uri}", "tracking.experiment=view"])
    client = MlflowClient(tracking_uri=uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = Tracker()
        run_id = first.start(cfg, tmp_path / "a")
        first.end()
        experiment_id = client.get_run(run_id).info.experiment_id
        value = client.get_experiment(experiment_id).tags[key]
        time.sleep(0.01)
        second = Tracker()
        second.start(cfg, tmp_path / "b")
        second.end()
    assert not _view_warnings(caught)
    assert first.link == second.link == ui_link(uri, experiment_id)
    assert first.link.endswith(f"&viewStateShareKey={VIEW_KEY}")
    assert client.get_experiment(experiment_id).tags[key] == value  # not rewritten
    envelope = json.loads(value)
    assert envelope["name"] == VIEW_NAME and isinstance(envelope["createdAt"], int)
    assert json.loads(envelope["state"]) == {
        "selectedColumns": [f"metrics.`{name}`" for name in VIEW_METRICS]}
    assert "test_acc" in VIEW_METRICS

    # a view changed (saved over) in the UI is the user's: kept as it is
    client.set_experiment_tag(experiment_id, key, "theirs")
    third = Tracker()
    third.start(cfg, tmp_path / "c")
    third.end()
    assert client.get_experiment(experiment_id).tags[key] == "theirs"

    # a sweep's parent run in a new experiment: its summary link saves the view
    sweep = Tracker()
    sweep.open(uri, "view-sweep", "sweep", {}, start_tags={"hmaml.kind": "sweep"})
    parent = sweep.run_id
    assert parent is not None
    later = Tracker()
    assert later.attach(uri, parent)
    sweep_experiment = client.get_run(parent).info.experiment_id
    assert later.link == sweep.link == ui_link(uri, sweep_experiment)
    assert key in client.get_experiment(sweep_experiment).tags


def test_a_view_that_cannot_be_saved_warns_and_the_run_goes_on(store: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    from mlflow import MlflowClient

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError("experiment tags are read-only")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refused)
    uri = f"sqlite:///{store}"
    cfg = load_config("quickstart", [f"tracking.uri={uri}", "tracking.experiment=no-view"])
    tracker = Tracker()
    with pytest.warns(RuntimeWarning, match="could not be saved.*read-only"):
        run_id = tracker.start(cfg, tmp_path / "run")
    assert run_id and tracker.active  # tracking goes on
    assert tracker.link and "viewStateShareKey" not in tracker.link  # MLflow's default columns
    with no_tracking_warning():
        tracker.log_metrics({"test_acc": 50.0}, step=1)
        tracker.end()
    assert MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics == {"test_acc": 50.0}
